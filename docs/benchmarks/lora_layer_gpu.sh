#!/usr/bin/env bash
# Our LoRA layer (core/train/lora.py) on the GPU (bf16 base, fp32 adapters): against PEFT where installed, and a distill run.
set -u
source .whlavx/env.sh  # the GPU machine lacks omegaconf and av (../shared/tools/gpu-prep.sh)
export PYTHONPATH=$PWD:/tmp/site  # env.sh put av and omegaconf there
nvidia-smi --query-gpu=name --format=csv,noheader
python - <<'PY'
import torch
from tests.conftest import tiny_model, text_context
from core.train.lora import attach_lora, lora_parameters, init_adapters, LoRALinear
from core.checkpoint import block_linear_names
def run(model):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.device))
    x = torch.randn(1, 48, 2, 8, 8, generator=torch.Generator().manual_seed(0)).cuda().bfloat16()
    t = torch.full((1, 2), 700.0, device="cuda")
    out = model(x, t, text_context(1, 0).cuda().bfloat16(), frames_per_block=2)
    out.float().square().mean().backward()
    return out, [p.grad for p in lora_parameters(model).values()]
ours = attach_lora(tiny_model(dtype=torch.bfloat16).cuda(), rank=4, alpha=8, dropout=0.0, seed=3)
o, g = run(ours)
print("ours on", o.device, o.dtype, "adapters", {p.dtype for p in lora_parameters(ours).values()}, "finite", bool(torch.isfinite(o).all()))
try:
    import peft
except ImportError:
    print("peft not installed here: PEFT comparison skipped")
else:
    theirs = tiny_model(dtype=torch.bfloat16).cuda()
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=block_linear_names(len(theirs.blocks))), theirs)
    init_adapters(theirs, 3)
    o2, g2 = run(theirs)
    print("peft", peft.__version__, "forward equal", torch.equal(o, o2), "grads equal", all(torch.equal(a, b) for a, b in zip(g, g2)))
PY
rm -rf /tmp/d; timeout 200 python -m longlive_cli distill distill_tiny --max-steps 30 --logdir /tmp/d --no-resume \
  --set runtime.device=cuda --set runtime.dtype=bfloat16 --export-lora /tmp/d/lora.safetensors 2>&1 | tail -4
