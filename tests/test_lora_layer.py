"""Our LoRA layer against PEFT's injection (what `attach_lora` used before): the same parameter
names (so training checkpoints written either way load in the other), the same trainable set,
and the same forward and gradients bit for bit, in fp32 and on a bf16 base."""

import pytest
import torch
from torch import nn

from core.checkpoint import block_linear_names
from core.train.lora import LoRALinear, attach_lora, init_adapters, lora_parameters
from tests.conftest import text_context, tiny_model


def peft_attach(model: nn.Module, *, rank: int, alpha: float, dropout: float, seed: int) -> nn.Module:
    """The reference: PEFT injects its layers; the same seeded fp32 initialisation as `attach_lora`."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=block_linear_names(len(model.blocks)))
    peft.inject_adapter_in_model(config, model, adapter_name="default")
    init_adapters(model, seed)
    return model


def _randomise_b(model: nn.Module) -> None:
    """B starts at zero (the update is zero); give it values so the adapters act."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank, alpha, dropout", [(4, 8, 0.0), (2, 2, 0.25)])
def test_attach_lora_equals_peft_injection(base_dtype, rank, alpha, dropout):
    ours = attach_lora(tiny_model(dtype=base_dtype), rank=rank, alpha=alpha, dropout=dropout, seed=3)
    theirs = peft_attach(tiny_model(dtype=base_dtype), rank=rank, alpha=alpha, dropout=dropout, seed=3)
    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == len(block_linear_names(len(ours.blocks)))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(lora_parameters(ours))
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    _randomise_b(ours)
    _randomise_b(theirs)
    if dropout:
        ours.train()
        theirs.train()
    x = torch.randn(1, 48, 2, 8, 8, generator=torch.Generator().manual_seed(0)).to(base_dtype)
    t = torch.full((1, 2), 700.0)
    outputs, grads = [], []
    for model in (ours, theirs):
        torch.manual_seed(5)  # the same dropout masks
        out = model(x, t, text_context(1, 0).to(base_dtype), frames_per_block=2)
        out.float().square().mean().backward()
        outputs.append(out)
        grads.append([p.grad for p in lora_parameters(model).values()])
    assert outputs[0].dtype == base_dtype and torch.equal(outputs[0], outputs[1])
    assert all(g is not None and torch.equal(g, h) for g, h in zip(*grads, strict=True))
    assert any(g.abs().max() > 0 for g in grads[0])


def test_a_target_that_is_not_a_linear_is_named():
    model = tiny_model()
    model.blocks[0].ffn[0] = nn.Identity()
    with pytest.raises(TypeError, match=r"blocks\.0\.ffn\.0 is Identity"):
        attach_lora(model, rank=2, alpha=2, dropout=0.0, seed=0)
