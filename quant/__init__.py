"""Low-precision numerics (NVFP4, FP8) applied to a built model from outside."""
