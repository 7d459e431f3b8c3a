"""Stand-in networks in VBench's cache layout, for offline checks of the whole scoring path
(runs in the VBench environment): `python -m core.eval.standins CACHE_DIR [DIMENSION ...]`.

Where vbench ships the architecture (RAFT, AMT-S, MUSIQ via pyiqa), the stand-in IS that
architecture with seeded random weights; CLIP stand-ins are openai-clip's own `CLIP` class at a
small width, traced to TorchScript as OpenAI ships it (`clip.load` reads the widths back from the
shapes, so they load through the real path); DINO / DINOv2 (torch.hub code vbench does not ship)
get a small timm ViT behind a hubconf.
Scores from stand-ins are meaningless; what they prove is that every dimension's wiring runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HUBCONF = '''"""Stand-in torch.hub entry points (a small timm ViT), written by core.eval.standins."""
import timm
import torch

dependencies = ["torch", "timm"]


def _vit(patch_size):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", patch_size=patch_size, num_classes=0, pretrained=False,
                             dynamic_img_size=True, dynamic_img_pad=True)


def dino_vitb16(pretrained=True, **kwargs):
    return _vit(16)


def dinov2_vitb14(pretrained=True, **kwargs):
    return _vit(14)
'''


def _save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def _small_clip(embed_dim: int, patch_size: int):
    from clip.model import CLIP

    return CLIP(embed_dim=embed_dim, image_resolution=224, vision_layers=2, vision_width=64,
                vision_patch_size=patch_size, context_length=77, vocab_size=49408, transformer_width=64,
                transformer_heads=1, transformer_layers=1)


def _save_clip(embed_dim: int, patch_size: int, path: Path) -> None:
    """As OpenAI ships CLIP: a TorchScript archive (clip.load reads its state dict and rebuilds the model)."""
    import torch

    model = _small_clip(embed_dim, patch_size).eval()
    traced = torch.jit.trace(model, (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(path))


def build(cache: Path, dimensions: list[str]) -> None:
    """Write the stand-in files the given dimensions read (seeded: the same bytes every time)."""
    import torch

    torch.manual_seed(0)
    if "dynamic_degree" in dimensions:
        from easydict import EasyDict
        from vbench.third_party.RAFT.core.raft import RAFT

        args = EasyDict(small=False, mixed_precision=False, alternate_corr=False)
        _save(RAFT(args).state_dict(), cache / "raft_model/models/raft-things.pth")
    if "motion_smoothness" in dimensions:
        import os

        import vbench
        from omegaconf import OmegaConf
        from vbench.third_party.amt.utils.build_utils import build_from_cfg

        config = os.path.join(os.path.dirname(vbench.__file__), "third_party/amt/cfgs/AMT-S.yaml")
        network = build_from_cfg(OmegaConf.load(config).network)
        _save({"state_dict": network.state_dict()}, cache / "amt_model/amt-s.pth")
    if "subject_consistency" in dimensions:
        for repo in ("dino_model/facebookresearch_dino_main", "torch_hub/facebookresearch_dinov2_main"):
            (cache / repo).mkdir(parents=True, exist_ok=True)
            (cache / repo / "hubconf.py").write_text(_HUBCONF)
        for name in ("dino_model/dino_vitbase16_pretrain.pth", "torch_hub/checkpoints/dino_vitbase16_pretrain.pth",
                     "torch_hub/checkpoints/dinov2_vitb14_pretrain.pth"):
            _save({}, cache / name)  # present for the checks; the stand-in hubconf builds its own weights
    if {"background_consistency", "appearance_style"} & set(dimensions):
        _save_clip(512, 32, cache / "clip_model/ViT-B-32.pt")
    if "aesthetic_quality" in dimensions:
        _save_clip(768, 14, cache / "clip_model/ViT-L-14.pt")
        _save(torch.nn.Linear(768, 1).state_dict(), cache / "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth")
    if "imaging_quality" in dimensions:
        from pyiqa.archs.musiq_arch import MUSIQ

        _save(MUSIQ(pretrained=False).state_dict(), cache / "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth")


STANDIN_DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                      "dynamic_degree", "aesthetic_quality", "imaging_quality", "appearance_style")

if __name__ == "__main__":
    build(Path(sys.argv[1]), sys.argv[2:] or list(STANDIN_DIMENSIONS))
