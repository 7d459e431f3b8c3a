"""Per-dimension wiring into the vbench package (runs in the VBench environment).

Each scorer builds the dimension's networks the way vbench's `compute_<dimension>` does, from the
paths `vbench.utils.init_submodules(..., local=True)` gives (all under VBENCH_CACHE_DIR), then
calls vbench's own per-video function on a list of clips and returns one result per clip, in
order: the clip's score on the dimension's reported scale, plus `pair_scores` for dynamic degree.
No metric is re-implemented here; only model construction and result unpacking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class ClipItem:
    path: str  # a real clip file, or a virtual clip path (core.eval.virtual)
    prompt: str
    auxiliary: object = None  # VBench_full_info.json's auxiliary_info[dimension], when it has one


def _submodules(dimension: str) -> object:
    from vbench.utils import init_submodules

    return init_submodules([dimension], local=True)[dimension]


def _by_path(items: list[ClipItem], video_results: list[dict], key: str = "video_results") -> list[float]:
    found = {r["video_path"]: r[key] for r in video_results}
    missing = [i.path for i in items if i.path not in found]
    if missing:
        raise RuntimeError(f"vbench returned no score for {len(missing)} clip(s), e.g. {missing[0]} (unreadable?)")
    return [float(found[i.path]) for i in items]


def _prompt_dicts(items: list[ClipItem], dimension: str) -> list[dict]:
    out = []
    for item in items:
        entry = {"prompt": item.prompt, "video_list": [item.path]}
        if item.auxiliary is not None:
            entry["auxiliary_info"] = item.auxiliary
        out.append(entry)
    return out


# -- quality dimensions ---------------------------------------------------------------------------


@cache  # also reused by every video's clip-to-clip score
def load_dino(device: str) -> object:
    import torch

    return torch.hub.load(**_submodules("subject_consistency")).to(device)


@cache
def load_clip_b32(device: str) -> tuple[object, object]:
    import clip

    return clip.load(_submodules("background_consistency")[0], device=device)


def score_subject_consistency(items: list[ClipItem], device: str) -> list[dict]:
    from vbench.subject_consistency import subject_consistency

    _, results = subject_consistency(load_dino(device), [i.path for i in items], device, False)
    return [{"score": s} for s in _by_path(items, results)]


def score_background_consistency(items: list[ClipItem], device: str) -> list[dict]:
    from vbench.background_consistency import background_consistency

    clip_model, preprocess = load_clip_b32(device)
    _, results = background_consistency(clip_model, preprocess, [i.path for i in items], device, False)
    return [{"score": s} for s in _by_path(items, results)]


def score_temporal_flickering(items: list[ClipItem], device: str) -> list[dict]:
    from vbench.temporal_flickering import temporal_flickering

    _, results = temporal_flickering([i.path for i in items])
    return [{"score": s} for s in _by_path(items, results)]


def score_motion_smoothness(items: list[ClipItem], device: str) -> list[dict]:
    from vbench.motion_smoothness import MotionSmoothness, motion_smoothness

    sub = _submodules("motion_smoothness")
    _, results = motion_smoothness(MotionSmoothness(sub["config"], sub["ckpt"], device), [i.path for i in items])
    return [{"score": s} for s in _by_path(items, results)]


def _recording_dynamic_degree(args, device: str) -> object:
    """vbench's DynamicDegree, keeping the per-pair flow scores its check_move sees."""
    from vbench.dynamic_degree import DynamicDegree

    class RecordingDynamicDegree(DynamicDegree):
        pair_scores: dict[str, list[float]] = {}

        def infer(self, video_path):
            self._current = video_path
            return super().infer(video_path)

        def check_move(self, score_list):
            self.pair_scores[self._current] = [float(s) for s in score_list]
            return super().check_move(score_list)

    return RecordingDynamicDegree(args, device)


def score_dynamic_degree(items: list[ClipItem], device: str) -> list[dict]:
    from easydict import EasyDict
    from vbench.dynamic_degree import dynamic_degree

    args = EasyDict({"model": _submodules("dynamic_degree")["model"], "small": False,
                     "mixed_precision": False, "alternate_corr": False})
    dynamic = _recording_dynamic_degree(args, device)
    _, results = dynamic_degree(dynamic, [i.path for i in items])
    moving = _by_path(items, results)
    return [{"score": float(m), "pair_scores": dynamic.pair_scores[i.path]} for i, m in zip(items, moving, strict=True)]


def score_aesthetic_quality(items: list[ClipItem], device: str) -> list[dict]:
    import clip
    from vbench.aesthetic_quality import get_aesthetic_model, laion_aesthetic

    vit_path, aes_path = _submodules("aesthetic_quality")
    aesthetic_model = get_aesthetic_model(aes_path).to(device)
    clip_model, _ = clip.load(vit_path, device=device)
    _, results = laion_aesthetic(aesthetic_model, clip_model, [i.path for i in items], device)
    return [{"score": s} for s in _by_path(items, results)]


def score_imaging_quality(items: list[ClipItem], device: str) -> list[dict]:
    from vbench.imaging_quality import MUSIQ, technical_quality

    model = MUSIQ(pretrained_model_path=_submodules("imaging_quality")["model_path"])
    model.to(device)
    model.training = False
    _, results = technical_quality(model, [i.path for i in items], device, imaging_quality_preprocessing_mode="longer")
    return [{"score": s / 100.0} for s in _by_path(items, results)]  # VBench reports imaging quality / 100


# -- semantic dimensions --------------------------------------------------------------------------


def score_human_action(items: list[ClipItem], device: str) -> list[dict]:
    from vbench.human_action import human_action

    _, results = human_action(_submodules("human_action")[0], [i.path for i in items], device)
    return [{"score": s} for s in _by_path(items, results)]


def score_appearance_style(items: list[ClipItem], device: str) -> list[dict]:
    import clip
    from vbench.appearance_style import appearance_style

    clip_model, _ = clip.load(device=device, **_submodules("appearance_style"))
    _, results = appearance_style(clip_model, _prompt_dicts(items, "appearance_style"), device)
    return [{"score": s} for s in _by_path(items, results)]


def _viclip(dimension: str, device: str) -> tuple[object, object]:
    import os

    from vbench.third_party.ViCLIP.simple_tokenizer import SimpleTokenizer
    from vbench.third_party.ViCLIP.viclip import ViCLIP
    from vbench.utils import CACHE_DIR

    tokenizer = SimpleTokenizer(os.path.join(CACHE_DIR, "ViCLIP/bpe_simple_vocab_16e6.txt.gz"))
    return ViCLIP(tokenizer=tokenizer, **_submodules(dimension)).to(device), tokenizer


def score_temporal_style(items: list[ClipItem], device: str) -> list[dict]:
    from vbench.temporal_style import temporal_style

    model, tokenizer = _viclip("temporal_style", device)
    _, results = temporal_style(model, _prompt_dicts(items, "temporal_style"), tokenizer, device)
    return [{"score": s} for s in _by_path(items, results)]


def score_overall_consistency(items: list[ClipItem], device: str) -> list[dict]:
    from vbench.overall_consistency import overall_consistency

    model, tokenizer = _viclip("overall_consistency", device)
    _, results = overall_consistency(model, _prompt_dicts(items, "overall_consistency"), tokenizer, device)
    return [{"score": s} for s in _by_path(items, results)]


def score_scene(items: list[ClipItem], device: str) -> list[dict]:
    from vbench.scene import scene, tag2text_caption

    model = tag2text_caption(**_submodules("scene"))
    model.eval()
    model = model.to(device)
    _, results = scene(model, _prompt_dicts(items, "scene"), device)
    return [{"score": s} for s in _by_path(items, results)]


def _grit_scorer(dimension: str, function: str, initialize: str) -> Callable[[list[ClipItem], str], list[dict]]:
    def score(items: list[ClipItem], device: str) -> list[dict]:
        import importlib

        module = importlib.import_module(f"vbench.{dimension}")
        model = module.DenseCaptioning(device)
        getattr(model, initialize)(**_submodules(dimension))
        _, results = getattr(module, function)(model, _prompt_dicts(items, dimension), device)
        return [{"score": s} for s in _by_path(items, results)]

    return score


SCORERS: dict[str, Callable[[list[ClipItem], str], list[dict]]] = {
    "subject_consistency": score_subject_consistency,
    "background_consistency": score_background_consistency,
    "temporal_flickering": score_temporal_flickering,
    "motion_smoothness": score_motion_smoothness,
    "dynamic_degree": score_dynamic_degree,
    "aesthetic_quality": score_aesthetic_quality,
    "imaging_quality": score_imaging_quality,
    "object_class": _grit_scorer("object_class", "object_class", "initialize_model_det"),
    "multiple_objects": _grit_scorer("multiple_objects", "multiple_objects", "initialize_model_det"),
    "human_action": score_human_action,
    "color": _grit_scorer("color", "color", "initialize_model"),
    "spatial_relationship": _grit_scorer("spatial_relationship", "spatial_relationship", "initialize_model_det"),
    "scene": score_scene,
    "appearance_style": score_appearance_style,
    "temporal_style": score_temporal_style,
    "overall_consistency": score_overall_consistency,
}


# -- VBench-Long's clip-to-clip (fast) branch -----------------------------------------------------


@cache
def _dinov2(torch_hub_dir: str, device: str) -> object:
    import torch

    return torch.hub.load(f"{torch_hub_dir}/facebookresearch_dinov2_main", "dinov2_vitb14", source="local").to(device)


@cache
def _dreamsim(dreamsim_dir: str, device: str) -> tuple[object, object]:
    from dreamsim import dreamsim

    return dreamsim(pretrained=True, cache_dir=dreamsim_dir, device=device)


def clip2clip_score(dimension: str, path: str, device: str, dev_flag: bool, torch_hub_dir: str,
                    dreamsim_dir: str) -> float:
    """The consistency of a video made of each clip's first frame, with VBench-Long's extractor:
    DINOv2 ViT-B/14 (subject) / DreamSim (background) with --dev_flag, else DINO / CLIP ViT-B/32."""
    if dimension == "subject_consistency" and dev_flag:
        from vbench2_beta_long.subject_consistency import subject_consistency_dinov2

        _, results = subject_consistency_dinov2(_dinov2(torch_hub_dir, device), [path], device, False)
    elif dimension == "background_consistency" and dev_flag:
        from vbench2_beta_long.background_consistency import background_consistency_dreamsim

        model, preprocess = _dreamsim(dreamsim_dir, device)
        _, results = background_consistency_dreamsim(model, preprocess, [path], device, False)
    elif dimension == "subject_consistency":
        return score_subject_consistency([ClipItem(path, "")], device)[0]["score"]
    else:
        return score_background_consistency([ClipItem(path, "")], device)[0]["score"]
    return float(results[0]["video_results"])
