"""`parallelize(model, recipe, plan)`: the training transforms, applied from outside the model in
one fixed order (design.md §2):

    quantize -> SP plan -> activation checkpointing -> compile -> FSDP

Quantization swaps the block linears (so everything after sees the final modules); the SP plan
replaces `CausalWanDiT.sequence_attention`; checkpointing wraps each block's forward (the block's
all-to-alls re-run in the recompute); compile, when asked, compiles each block as wrapped; FSDP2
shards last, over the modules as they will run.
"""

from __future__ import annotations

import torch
from torch import nn

from core.config import Precision
from core.dit import CausalWanDiT
from core.train.ar import TrainPlan
from core.train.config import TrainRecipe
from sp.plan import apply_sequence_parallel
from sp.train_plan import SequenceParallelPlan


def parallelize(model: CausalWanDiT, recipe: TrainRecipe, plan: TrainPlan) -> nn.Module:
    """Prepare a built fp32 generator for training under `plan`; returns it (changed in place)."""
    if recipe.quant.precision == Precision.nvfp4:
        from quant.linear import ar_training_config, quantize_model

        quantize_model(model, ar_training_config())
    if isinstance(plan, SequenceParallelPlan) and plan.sp_size > 1:
        apply_sequence_parallel(model, plan.mesh, plan.layout)
    if recipe.train.activation_checkpointing:
        checkpoint_blocks(model)
    if recipe.runtime.compile == "always":  # "auto" does not compile training
        from core.optimize import compile_blocks

        compile_blocks(model)
    if plan.uses_fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        from sp.fsdp import shard_model

        compute = torch.bfloat16 if plan.device.type == "cuda" else torch.float32
        shard_model(model, init_device_mesh(plan.device.type, (plan.world_size,)), compute)
    return model


def checkpoint_blocks(model: CausalWanDiT) -> None:
    """Non-reentrant activation checkpointing of every block, keeping parameter names (the
    block's forward is wrapped on the instance, not the module)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
