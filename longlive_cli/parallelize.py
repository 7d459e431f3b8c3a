"""The training transforms, applied from outside the model in one fixed order (design.md §2):

    quantize -> LoRA -> SP plan -> activation checkpointing -> compile -> FSDP

`parallelize(model, recipe, plan)` prepares the AR generator; `parallelize_network(model, role,
recipe, plan)` one of the three networks of DMD distillation (no SP there). Quantization swaps
the block linears (so everything after sees the final modules; PEFT wraps the swapped layers, as
the official swaps before adding adapters); LoRA injects the adapters and freezes the base; the SP
plan replaces `CausalWanDiT.sequence_attention`; checkpointing wraps each block's forward (the
block's all-to-alls re-run in the recompute); compile, when asked, compiles each block as wrapped;
FSDP2 shards last, over the modules as they will run.
"""

from __future__ import annotations

import torch
from torch import nn

from core.config import Choice, Precision, QuantMode
from core.dit import CausalWanDiT
from core.train.ar import TrainPlan
from core.train.config import TrainRecipe
from core.train.distill_config import DistillRecipe
from sp.plan import apply_sequence_parallel
from sp.train_plan import SequenceParallelPlan


class Role(Choice):
    """The networks of DMD distillation (the official names)."""

    generator = "generator"  # the student: frozen base + trained LoRA
    real_score = "real_score"  # the teacher: frozen
    fake_score = "fake_score"  # the critic: frozen base + trained LoRA, or trained in full


def parallelize(model: CausalWanDiT, recipe: TrainRecipe, plan: TrainPlan) -> nn.Module:
    """Prepare a built fp32 generator for AR training under `plan`; returns it (changed in place)."""
    if recipe.quant.precision == Precision.nvfp4:
        from quant.linear import ar_training_config, quantize_model

        quantize_model(model, ar_training_config())
    if isinstance(plan, SequenceParallelPlan) and plan.sp_size > 1:
        apply_sequence_parallel(model, plan.mesh, plan.layout)
    return _finish(model, plan, recipe.train.activation_checkpointing, recipe.runtime.compile == "always")


def parallelize_network(model: CausalWanDiT, role: Role, recipe: DistillRecipe, plan: TrainPlan) -> nn.Module:
    """Prepare one built network of distillation (its frozen parts in the compute dtype, a fully
    trained critic in fp32) under `plan`; returns it (changed in place). With `quant.precision:
    nvfp4` (the official NVFP4 DMD config): the student's base linears run NVFP4 fprop and dgrad
    from weights quantized once (all rules mse, 2-D tiles), the teacher runs W4A4 (mse), the critic
    stays high precision."""
    nvfp4 = recipe.quant.precision == Precision.nvfp4
    if nvfp4 and role == Role.generator:
        from quant.linear import quantize_model
        from quant.nvfp4_train import NVFP4TrainingConfig

        rules = NVFP4TrainingConfig(weight_rule="mse", activation_rule="mse", gradient_rule="mse", weight_2d=True,
                                    seed=recipe.runtime.seed)
        quantize_model(model, rules)
    if nvfp4 and role == Role.real_score:
        from quant.linear import NVFP4Config, quantize_model

        teacher = NVFP4Config(mode=QuantMode.w4a4, weight_rule="mse", activation_rule="mse", weight_2d=True)
        quantize_model(model, teacher)
    adapter = recipe.adapter
    if role == Role.generator or (role == Role.fake_score and adapter.apply_to_critic):
        from core.train.lora import attach_lora

        attach_lora(model, rank=adapter.rank, alpha=adapter.alpha, dropout=adapter.dropout,
                    seed=2 * recipe.runtime.seed + (role == Role.fake_score))
        _materialize_frozen_nvfp4(model)
    elif role == Role.real_score:
        model.requires_grad_(False)
    trains = role != Role.real_score
    return _finish(model, plan, trains and recipe.train.activation_checkpointing, recipe.runtime.compile == "always")


def _materialize_frozen_nvfp4(model: nn.Module) -> None:
    from quant.nvfp4_train import NVFP4TrainLinear

    for module in model.modules():
        if isinstance(module, NVFP4TrainLinear) and not module.weight.requires_grad:
            module.materialize()


def _finish(model: CausalWanDiT, plan: TrainPlan, checkpointing: bool, compile_blocks: bool) -> nn.Module:
    """The common tail: activation checkpointing -> compile -> FSDP2 (bf16 compute on GPUs)."""
    if checkpointing:
        checkpoint_blocks(model)
    if compile_blocks:  # runtime.compile "always"; "auto" does not compile training
        from core.optimize import compile_blocks as compile_each_block

        compile_each_block(model)
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
