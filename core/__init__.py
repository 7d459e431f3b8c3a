"""The model, cache, sampler and pipeline: plain PyTorch, single device."""
