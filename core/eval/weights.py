"""VBench's pretrained networks: where each lives in the cache and where it comes from.

The cache is VBench's own layout (`VBENCH_CACHE_DIR`, default `~/.cache/vbench`, what
`vbench.utils.init_submodules(local=True)` reads), plus `torch_hub/` (DINO and DINOv2 code and
weights for torch.hub) and `dreamsim/` (VBench-Long's fast branch), so one folder holds everything
and can be copied to an offline machine. `longlive download --eval` fills it; `eval-vbench` checks
it before any generation or scoring.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError, first_names

DEFAULT_CACHE_DIR = Path("~/.cache/vbench").expanduser()
_HF = "https://huggingface.co"
_CLIP = "https://openaipublic.azureedge.net/clip/models"


@dataclass(frozen=True)
class CacheFile:
    path: str  # relative to the cache dir: the file that must exist
    url: str
    member: str | None = None  # take this member of the downloaded zip (a folder prefix ending in "/")


DINO_REPO = CacheFile("dino_model/facebookresearch_dino_main/hubconf.py",
                      "https://github.com/facebookresearch/dino/archive/refs/heads/main.zip", "dino-main/")
DINO = CacheFile("dino_model/dino_vitbase16_pretrain.pth",
                 "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth")
DINO_HUB = CacheFile("torch_hub/checkpoints/dino_vitbase16_pretrain.pth", DINO.url)
CLIP_B32 = CacheFile("clip_model/ViT-B-32.pt",
                     f"{_CLIP}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
CLIP_L14 = CacheFile("clip_model/ViT-L-14.pt",
                     f"{_CLIP}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt")
VICLIP = (CacheFile("ViCLIP/ViClip-InternVid-10M-FLT.pth",
                    f"{_HF}/OpenGVLab/VBench_Used_Models/resolve/main/ViClip-InternVid-10M-FLT.pth"),
          CacheFile("ViCLIP/bpe_simple_vocab_16e6.txt.gz",
                    "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"))
GRIT = (CacheFile("grit_model/grit_b_densecap_objectdet.pth",
                  "https://datarelease.blob.core.windows.net/grit/models/grit_b_densecap_objectdet.pth"),)

DIMENSION_FILES: dict[str, tuple[CacheFile, ...]] = {
    "subject_consistency": (DINO_REPO, DINO, DINO_HUB),
    "background_consistency": (CLIP_B32,),
    "temporal_flickering": (),
    "motion_smoothness": (CacheFile("amt_model/amt-s.pth", f"{_HF}/lalala125/AMT/resolve/main/amt-s.pth"),),
    "dynamic_degree": (CacheFile("raft_model/models/raft-things.pth",
                                 "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip",
                                 "models/raft-things.pth"),),
    "aesthetic_quality": (CLIP_L14, CacheFile(
        "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
        "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth")),
    "imaging_quality": (CacheFile(
        "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
        "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth"),),
    "object_class": GRIT, "multiple_objects": GRIT, "color": GRIT, "spatial_relationship": GRIT,
    "human_action": (CacheFile("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
                               f"{_HF}/OpenGVLab/VBench_Used_Models/resolve/main/l16_ptk710_ftk710_ftk400_f16_res224.pth"),),
    "scene": (CacheFile("caption_model/tag2text_swin_14m.pth",
                        f"{_HF}/spaces/xinyu1205/recognize-anything/resolve/main/tag2text_swin_14m.pth"),),
    "appearance_style": (CLIP_B32,),
    "temporal_style": VICLIP,
    "overall_consistency": VICLIP,
}
# VBench-Long's clip-to-clip extractors with --dev-flag (without it, the in-clip networks above).
FAST_BRANCH_FILES: dict[str, tuple[CacheFile, ...]] = {
    "subject_consistency": (
        CacheFile("torch_hub/facebookresearch_dinov2_main/hubconf.py",
                  "https://github.com/facebookresearch/dinov2/archive/refs/heads/main.zip", "dinov2-main/"),
        CacheFile("torch_hub/checkpoints/dinov2_vitb14_pretrain.pth",
                  "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth")),
    "background_consistency": (CacheFile(
        "dreamsim/ensemble_lora/adapter_config.json",
        "https://github.com/ssundaram21/dreamsim/releases/download/v0.2.0-checkpoints/"
        "dreamsim_ensemble_checkpoint.zip", ""),),
}


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """--cache-dir, else VBENCH_CACHE_DIR (VBench's own variable), else ~/.cache/vbench."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ["VBENCH_CACHE_DIR"]).expanduser() if "VBENCH_CACHE_DIR" in os.environ else DEFAULT_CACHE_DIR


def required_files(dimensions: Iterable[str], mode: str = "long", dev_flag: bool = True) -> list[CacheFile]:
    """The cache files a run needs, each once, in dimension order."""
    needed: dict[str, CacheFile] = {}
    for dimension in dimensions:
        extra = FAST_BRANCH_FILES.get(dimension, ()) if (mode == "long" and dev_flag) else ()
        for item in DIMENSION_FILES[dimension] + extra:
            needed.setdefault(item.path, item)
    return list(needed.values())


def check_weights(dimensions: Iterable[str], cache_dir: Path, mode: str = "long", dev_flag: bool = True) -> None:
    """One line naming the missing files and the command that fetches them (before any heavy work)."""
    dimensions = list(dimensions)
    missing = [f.path for f in required_files(dimensions, mode, dev_flag) if not (cache_dir / f.path).exists()]
    if missing:
        dims = ",".join(dimensions)
        raise UserError(f"VBench weights missing in {cache_dir}: {len(missing)} file(s) ({first_names(missing)}): "
                        f"run `longlive download --eval --cache-dir {cache_dir} --dimensions {dims}` on a machine "
                        f"with network access (or copy that folder here)")


def _fetch_url(url: str, target: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:  # noqa: S310 - fixed URLs
        shutil.copyfileobj(response, out, length=1 << 20)


def fetch(item: CacheFile, cache_dir: Path, fetch_url: Callable[[str, Path], None] = _fetch_url) -> None:
    """Download one cache entry (unzipping the named member or folder); each file lands by rename."""
    target = cache_dir / item.path
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as temp:
        download = Path(temp) / "download"
        fetch_url(item.url, download)
        if item.member is None:
            os.replace(download, target)
            return
        with zipfile.ZipFile(download) as archive:
            archive.extractall(Path(temp) / "unpacked")
        source = Path(temp) / "unpacked" / item.member
        if item.member.endswith("/") or item.member == "":  # a folder: what torch.hub / dreamsim expect
            destination = target.parent if item.member else cache_dir / Path(item.path).parts[0]
            for entry in source.iterdir():
                final = destination / entry.name
                if not final.exists():
                    os.replace(entry, final)
        else:
            os.replace(source, target)
