"""`longlive eval-vbench`: VBench / VBench-Long scores of existing videos or of a generated prompt suite.

    longlive eval-vbench VIDEO_OR_DIR... --out results.json [--mode long|standard] [--dimensions a,b]
        [--scene-split] [--scene-threshold 35] [--clip-seconds S] [--clip-source frames|reencoded]
        [--dev-flag/--no-dev-flag] [--cache-dir DIR] [--device cuda|cpu]
    longlive eval-vbench --suite vbench|--prompt-file FILE --out results.json [generation options]
    longlive eval-vbench --suite shapes --out shapes.json [--dimensions prompts,multishot,interactive,long]
        [--max-prompts N] [--seconds S] [generation options]   (the offline shapes-world probe)
    longlive eval-vbench --compare A.json B.json ...

Every check (inputs, dimensions, output folder, weights, the VBench environment) runs before any
generation or scoring; scoring runs in the VBench environment (core.eval.environment).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.config import VIDEO_FPS, KVPrecision, Precision, QuantMode
from core.errors import UserError
from longlive_cli.app import app
from longlive_cli.options import DEFAULTS, KvPrecisionOpt, PrecisionOpt, QuantModeOpt, RandomWeightsOpt, default_note

if TYPE_CHECKING:
    import torch

    from core.shots import PromptSchedule

VIDEO_SUFFIXES = (".mp4",)


@dataclass(frozen=True)
class EvalVideo:
    name: str  # file stem: the key in results.json
    path: Path
    prompt: str
    auxiliary: dict  # VBench's auxiliary_info per dimension (prompt suites only)
    dimensions: tuple[str, ...] | None = None  # the dimensions its prompt serves (None: all asked)


def prompt_from_name(stem: str) -> str:
    """VBench's custom-input rule: the file name without a trailing `-<index>`."""
    import re

    return re.sub(r"-\d+$", "", stem)


def collect_videos(inputs: list[str]) -> list[EvalVideo]:
    """Files and folders (their .mp4 files, sorted) -> videos with unique stems."""
    paths: list[Path] = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"{path} holds no .mp4 videos: give a folder of mp4 files or the files themselves")
            paths.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in VIDEO_SUFFIXES:
                raise UserError(f"{path}: not an .mp4 video (VBench reads mp4 files)")
            paths.append(path)
        else:
            raise UserError(f"{path} not found: give mp4 files or folders of them")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems and stems[path.stem] != path.resolve():
            raise UserError(f"two videos are named {path.stem!r} ({stems[path.stem]}, {path}): results are "
                            f"keyed by file name, rename one")
        stems[path.stem] = path.resolve()
    return [EvalVideo(stem, path, prompt_from_name(stem), {}) for stem, path in stems.items()]


def parse_dimensions(text: str | None, mode: str, suite: bool) -> tuple[str, ...]:
    """--dimensions a,b,c. Default: all 16 for a prompt suite; for existing videos Table 5's six in
    long mode, and in standard mode the ten VBench scores without its prompt info."""
    from core.eval.vbench import AUXILIARY_DIMENSIONS, DIMENSIONS, LONG_TABLE_DIMENSIONS

    if text is None:
        if suite:
            return DIMENSIONS
        if mode == "long":
            return LONG_TABLE_DIMENSIONS
        return tuple(d for d in DIMENSIONS if d not in AUXILIARY_DIMENSIONS)
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in DIMENSIONS]
    if unknown or not names:
        raise UserError(f"--dimensions: {unknown[0] if unknown else '(empty)'!r} is not a VBench dimension; "
                        f"choose from {', '.join(DIMENSIONS)}")
    return names


def check_custom_input(dimensions: tuple[str, ...]) -> None:
    """Existing videos carry no VBench prompt info: refuse the dimensions that read it (as VBench does)."""
    from core.eval.vbench import AUXILIARY_DIMENSIONS

    needs = [d for d in dimensions if d in AUXILIARY_DIMENSIONS]
    if needs:
        raise UserError(f"--dimensions {needs[0]} needs VBench's prompt info (object, colour, scene, style), "
                        f"which existing videos lack: generate with --suite vbench, or drop "
                        f"{', '.join(needs)}")


def check_out(out: str) -> Path:
    path = Path(out).expanduser()
    if path.suffix.lower() != ".json":
        raise UserError(f"--out {path}: give a .json file (CSV, Markdown and plots are written beside it)")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: folder {path.parent} does not exist")
    from core.checkpoint import check_writable

    check_writable(path, "--out")  # before hours of generation and scoring
    return path


def check_device(device: str) -> str:
    if device not in ("cuda", "cpu") and not device.startswith("cuda:"):
        raise UserError(f"--device {device}: choose cuda, cuda:N or cpu")
    if device.startswith("cuda"):
        from longlive_cli.options import check_device as check_cuda

        check_cuda(device)
    return device


# -- scoring and outputs ---------------------------------------------------------------------------


def score_videos(videos: list[EvalVideo], settings, cache_dir: Path, python: Path) -> dict:
    """The worker's raw per-clip scores for `videos` (one process in the VBench environment)."""
    from core.eval.environment import run_worker

    request = {"settings": settings.as_dict(), "cache_dir": str(cache_dir), "work_dir": None,
               "videos": [{"name": v.name, "path": str(v.path), "prompt": v.prompt, "auxiliary": v.auxiliary,
                           "dimensions": list(v.dimensions) if v.dimensions is not None else None}
                          for v in videos]}
    return run_worker(python, request)


def write_outputs(out: Path, results: dict, provenance: dict) -> list[Path]:
    """results.json, then beside it `<stem>.csv`, `<stem>.md`, `<stem>.provenance.json` and the plots."""
    from core.eval.report import clips_csv, markdown_tables, write_plots, write_text

    stem = out.with_suffix("")
    write_text(out, json.dumps(results, indent=1) + "\n")
    paths = [out, stem.with_suffix(".csv"), stem.with_suffix(".md"), Path(f"{stem}.provenance.json")]
    write_text(paths[1], clips_csv(results))
    write_text(paths[2], markdown_tables({stem.name: results}))
    write_text(paths[3], json.dumps(provenance, indent=1) + "\n")
    return paths + write_plots(results, stem)


def summary_table(results: dict) -> Table:
    table = Table(title=f"eval-vbench ({results['mode']}, {len(results['videos'])} videos)", title_justify="left")
    table.add_column("dimension")
    table.add_column("score", justify="right")
    table.add_column("clips", justify="right")
    for dimension, entry in results["dimensions"].items():
        clips = sum(len(v["dimensions"][dimension]["clips"]) for v in results["videos"].values())
        table.add_row(dimension, f"{100 * entry['score']:.2f}", str(clips))
    if results["aggregate"] is not None:
        for key in ("quality", "semantic", "total"):
            table.add_row(key, f"{100 * results['aggregate'][key]:.2f}", "")
    return table


def evaluate(videos: list[EvalVideo], settings, cache_dir: Path, python: Path, out: Path,
             provenance: dict) -> dict:
    """Score, assemble, write; returns results.json's content."""
    from core.eval.results import build_results

    scored = score_videos(videos, settings, cache_dir, python)
    results, fusions = build_results(settings, scored)
    provenance = {**provenance, "versions": scored["versions"], "settings": settings.as_dict(),
                  "cache_dir": str(cache_dir), "slow_fast": fusions}
    paths = write_outputs(out, results, provenance)
    console = Console()
    console.print(summary_table(results))
    for path in paths:
        console.print(f"wrote {path}", soft_wrap=True, highlight=False)
    return results


def compare(paths: list[str]) -> None:
    from core.eval.report import comparison_rows, load_results, markdown_tables

    if len(paths) < 2:
        raise UserError("--compare needs at least two results.json files")
    runs = load_results(paths)
    header, rows = comparison_rows(runs)
    table = Table(title="eval-vbench comparison (x100; Δ to the first)", title_justify="left")
    for k, column in enumerate(header):
        table.add_column(column, justify="left" if k == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(markdown_tables(runs), highlight=False, soft_wrap=True)


# -- the generate source ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationOptions:
    preset: str | None
    recipe: str | None
    sets: tuple[str, ...]
    model_dir: str | None
    checkpoint: str | None
    lora: str | None
    steps: int | None
    precision: Precision | None
    quant_mode: QuantMode | None
    kv_precision: KVPrecision | None
    seconds: float | None
    device: str
    random_weights: bool = False


@dataclass(frozen=True)
class GenerationJob:
    prompt: str
    seed: int
    output: Path
    schedule: PromptSchedule | None = None  # default: `prompt` over the whole video
    interactive: bool = False  # the schedule's `continue` shots arrive as live prompt switches


def generation_recipe(options: GenerationOptions, seed: int):
    """The recipe every generated video of a run uses (its own noise seed)."""
    from longlive_cli.options import quant_flags, resolve_generation_recipe

    return resolve_generation_recipe(options.preset, options.recipe, options.sets, {
        "stream": {"sampling_steps": options.steps}, "runtime": {"seed": seed, "device": options.device},
        "quant": quant_flags(options.precision, options.quant_mode, options.kv_precision)},
        random_weights=options.random_weights, checkpoint=options.checkpoint, lora=options.lora)


def generation_settings(options: GenerationOptions, recipe=None) -> dict:
    """What every video of a run shares (longlive_cli.suite_videos): the resolved recipe (given,
    or resolved here) and the fingerprints of the model files it reads."""
    from longlive_cli.suite_videos import file_fingerprint, recipe_settings

    recipe = recipe or generation_recipe(options, 0)
    files = {"checkpoint": options.checkpoint, "lora": options.lora}
    if recipe.preset == "shapes" and not options.random_weights:
        from core.generate import shapes_files

        shapes = shapes_files(options.model_dir, options.checkpoint)
        files.update(dit=None if options.checkpoint else shapes.dit, vae=shapes.vae, text_encoder=shapes.text_encoder)
    else:
        files["model_dir"] = options.model_dir
    return {"recipe": recipe_settings(recipe), "random_weights": options.random_weights,
            "files": {name: file_fingerprint(path) for name, path in files.items() if path}}


def _request(job: GenerationJob, options: GenerationOptions):
    """A job's GenerateRequest; an interactive job runs its first prompt, the switches come live."""
    from core.generate import GenerateRequest
    from core.shots import durations_to_chunks, single_prompt_schedule

    recipe = generation_recipe(options, job.seed)
    fpb = recipe.stream.frames_per_block
    schedule = job.schedule
    if schedule is None:
        chunks = (durations_to_chunks([round(options.seconds * VIDEO_FPS)], fpb)[0] if options.seconds
                  else max(1, recipe.video.latent_frames // fpb))
        schedule = single_prompt_schedule(job.prompt, chunks, fpb)
    elif job.interactive:
        schedule = single_prompt_schedule(schedule.shots[0].prompt, schedule.num_chunks, schedule.frames_per_block)
    return GenerateRequest(recipe=recipe, schedule=schedule, output=job.output,
                           model_dir=Path(options.model_dir) if options.model_dir else None,
                           checkpoint=Path(options.checkpoint) if options.checkpoint else None,
                           lora=Path(options.lora) if options.lora else None)


def scheduled_switches(schedule: PromptSchedule, text, dtype: torch.dtype, device: torch.device):
    """`generate_video`'s prompt feed that types the schedule's later shots at their first chunks
    (reproducible: each is encoded when its chunk starts)."""
    from core.interactive import ScriptedPrompts

    starts = {span.start_chunk: span.prompt for span in schedule.spans[1:]}
    return ScriptedPrompts(starts, lambda prompt: text.encode([prompt]).to(device=device, dtype=dtype))


def generate_suite_videos(jobs: list[GenerationJob], options: GenerationOptions,
                          on_video=lambda done, total: None) -> None:
    """The ONE place that drives generation (`core.generate` + the builder). Every job uses the
    same recipe but its own noise seed; the models (DiT, VAE, text encoder) are built once, from
    the first job's settings, and reused. Every request is checked before the first video."""
    from core.generate import generate_video, prepare
    from longlive_cli.build import build_models, check_dit_spec, generation_spec, show_lora_sampling_note

    requests = [_request(job, options) for job in jobs]
    placements = [prepare(request) for request in requests]
    if not requests:
        return
    spec = generation_spec(requests[0], placements[0])
    check_dit_spec(spec)
    show_lora_sampling_note(requests[0].lora, requests[0].recipe.stream)
    models = build_models(requests[0], placements[0], spec)
    for done, (job, request, placement) in enumerate(zip(jobs, requests, placements, strict=True)):
        switches = scheduled_switches(job.schedule, models.text, placement.dtype, placement.device) \
            if job.interactive else None
        generate_video(request, placement, models, prompt_source=switches, log=lambda text: None)
        on_video(done + 1, len(requests))


class SuiteSource:
    """`core.eval.suites.VideoSource` over the command's generation options (external suites)."""

    def __init__(self, options: GenerationOptions):
        self.options = options
        recipe = generation_recipe(options, 0)  # tiny may mean the shipped shapes models
        if recipe.preset == "shapes":  # its files, before any video is planned
            from core.generate import shapes_files

            shapes_files(options.model_dir, options.checkpoint)
        self.frames_per_block = recipe.stream.frames_per_block
        self.settings = {"preset": recipe.preset, "steps": recipe.stream.sampling_steps,
                         "model_dir": options.model_dir, "checkpoint": options.checkpoint, "lora": options.lora,
                         "precision": str(recipe.quant.precision), "random_weights": options.random_weights}
        self.stamp_settings = generation_settings(options, recipe)

    def claim(self, videos) -> None:
        """Videos already written may be kept only when made as this run makes them
        (longlive_cli.suite_videos); otherwise one line, before any generation."""
        from longlive_cli.suite_videos import claim_folder, jsonable

        for folder in sorted({v.output.parent for v in videos}):
            folder.mkdir(parents=True, exist_ok=True)
            claim_folder(folder, self.stamp_settings, {
                v.output.stem: {"seed": v.seed, "schedule": jsonable(v.schedule), "interactive": v.interactive}
                for v in videos if v.output.parent == folder})

    def generate(self, videos) -> None:
        """Videos already written (and claimed) are kept: a run can resume."""
        jobs = [GenerationJob(v.schedule.shots[0].prompt, v.seed, v.output, v.schedule, v.interactive)
                for v in videos if not v.output.exists()]
        console = Console(stderr=True)
        if len(jobs) < len(videos):
            console.print(f"{len(videos) - len(jobs)} of {len(videos)} videos already made with these settings: kept")
        generate_suite_videos(jobs, self.options, lambda done, total: console.print(f"generated {done}/{total}"))


def plan_suite(prompts, samples: int | None, base_seed: int, videos_dir: Path) -> tuple[
        list[GenerationJob], list[EvalVideo], dict[str, int]]:
    """Sample i of each prompt: `{prompt}-{i}.mp4` (VBench's naming) with seed `base_seed + i`
    (the seeds by video name are returned too); videos already there are kept (a run can resume)."""
    from core.eval.suites import samples_for, video_stem

    jobs, videos, seeds = [], [], {}
    for prompt in prompts:
        for i in range(samples_for(prompt, samples)):
            stem = video_stem(prompt.prompt, i)
            path = videos_dir / f"{stem}.mp4"
            if not path.exists():
                jobs.append(GenerationJob(prompt.prompt, base_seed + i, path))
            videos.append(EvalVideo(stem, path, prompt.prompt, prompt.auxiliary, prompt.dimensions))
            seeds[stem] = base_seed + i
    if len(seeds) != len(videos):
        raise UserError("the prompt suite repeats a prompt: each prompt must be unique (videos are named after it)")
    return jobs, videos, seeds


def suite_prompts(suite: str | None, prompt_file: str | None, dimensions: tuple[str, ...], python: Path):
    """(prompts, the file they came from) of --suite vbench or --prompt-file."""
    from core.eval.suites import VBENCH_SUITE, load_prompts, vbench_suite_file

    if suite is not None and prompt_file is not None:
        raise UserError("give --suite or --prompt-file, not both")
    if suite is not None and suite != VBENCH_SUITE:
        raise UserError(f"--suite {suite}: choose vbench (VBench's standard prompts), shapes, or use --prompt-file")
    path = vbench_suite_file(python) if suite is not None else Path(prompt_file).expanduser()
    return load_prompts(path, dimensions), path


def run_external_suite(name: str, out: Path, device: str, dimensions: str | None, gen: GenerationOptions, *,
                       max_prompts: int | None, seed: int, videos_dir: str | None, extra_inputs: bool = False) -> None:
    """A suite that brings its own evaluation (EXTERNAL_SUITES): its module's run_eval_suite, given
    the --dimensions names as they are (the suite checks them) and this command's generation.
    `extra_inputs`: videos or --samples were given too (refused: the suite makes its own)."""
    import importlib

    from core.eval.suites import EXTERNAL_SUITES

    if name not in EXTERNAL_SUITES:
        raise UserError(f"--suite {name}: choose vbench (VBench's standard prompts), {', '.join(EXTERNAL_SUITES)}, "
                        f"or use --prompt-file")
    if extra_inputs:
        raise UserError(f"--suite {name} generates its own videos, one per prompt: drop the videos / --samples")
    try:
        module = importlib.import_module(EXTERNAL_SUITES[name])
    except ModuleNotFoundError:
        raise UserError(f"--suite {name}: {EXTERNAL_SUITES[name]} is not in this installation") from None
    names = tuple(n.strip() for n in dimensions.split(",") if n.strip()) if dimensions is not None else None
    if max_prompts is not None and max_prompts < 1:
        raise UserError(f"--max-prompts {max_prompts}: use 1 or more")
    if gen.seconds is not None and gen.seconds <= 0:
        raise UserError(f"--seconds {gen.seconds}: the length must be positive")
    module.run_eval_suite(out, device, names, source=SuiteSource(gen), max_prompts=max_prompts,
                          seconds=gen.seconds, seed=seed, videos_dir=Path(videos_dir).expanduser() if videos_dir
                          else None)
    console, markdown = Console(), out.with_suffix(".md")
    if markdown.is_file():
        console.print(markdown.read_text(encoding="utf-8"), highlight=False, markup=False)
    console.print(f"wrote {out}" + (f", {markdown}" if markdown.is_file() else ""), soft_wrap=True, highlight=False)


def _settings(mode, dimensions, scene_split, scene_threshold, clip_seconds, clip_source, dev_flag, device):
    from core.eval.results import EvalSettings

    try:
        return EvalSettings(mode=mode, dimensions=dimensions, scene_split=scene_split,
                            scene_threshold=scene_threshold, clip_seconds=clip_seconds,
                            clip_source=clip_source, dev_flag=dev_flag, device=device)
    except ValueError as err:
        option = str(err).split("=")[0].split(" ")[0].replace("_", "-")
        raise UserError(f"--{option}: {err}") from None


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_suite(suite, prompt_file, samples, seed, videos_dir, gen: GenerationOptions, settings, cache_dir,
               python, out: Path, max_prompts: int | None = None) -> None:
    from core.checkpoint import file_sha256

    if max_prompts is not None and max_prompts < 1:
        raise UserError(f"--max-prompts {max_prompts}: use 1 or more")
    prompts, path = suite_prompts(suite, prompt_file, settings.dimensions, python)
    prompts = prompts[:max_prompts]
    folder = Path(videos_dir).expanduser() if videos_dir else out.with_name(out.stem + "_videos")
    if samples is not None and samples < 1:
        raise UserError(f"--samples {samples}: generate at least one video per prompt")
    folder.mkdir(parents=True, exist_ok=True)
    jobs, videos, seeds = plan_suite(prompts, samples, seed, folder)
    from longlive_cli.suite_videos import claim_folder

    claim_folder(folder, generation_settings(gen),
                 {v.name: {"prompt": v.prompt, "seed": seeds[v.name], "seconds": gen.seconds} for v in videos})
    console = Console(stderr=True)
    console.print(f"{len(prompts)} prompts, {len(videos)} videos ({len(jobs)} to generate) in {folder}")
    generate_suite_videos(jobs, gen, lambda done, total: console.print(f"generated {done}/{total}"))
    provenance = {"source": "suite", "prompt_file": str(path), "prompt_file_sha256": file_sha256(path),
                  "videos_dir": str(folder), "seeds": seeds,
                  "generation": {k: v for k, v in vars(gen).items()}}
    evaluate(videos, settings, cache_dir, python, out, provenance)


# Generation options whose defaults come from the recipe (shown like typer's own defaults).
GenPresetOpt = Annotated[str | None, typer.Option(
    help="Generation: wan2.2-ti2v-5b, tiny or shapes." + default_note(DEFAULTS.preset))]
GenStepsOpt = Annotated[int | None, typer.Option(
    help="Sampling steps (4 or 2)." + default_note(DEFAULTS.stream.sampling_steps))]
GenSecondsOpt = Annotated[float | None, typer.Option(
    help="Generated video length in seconds." + default_note("the recipe's length"))]


# The scoring options of eval-vbench (module level: the command's signature stays readable).
InputsArg = Annotated[list[str] | None, typer.Argument(
    metavar="VIDEO_OR_DIR...", help="mp4 files or folders of them (with --compare: results.json files).")]
OutOpt = Annotated[str | None, typer.Option(help="results.json to write (CSV, Markdown, plots beside it).")]
ModeOpt = Annotated[str, typer.Option(help="long (VBench-Long clips) or standard (VBench, whole videos).")]
DimensionsOpt = Annotated[str | None, typer.Option(help="Comma-separated VBench dimensions.")]
SceneSplitOpt = Annotated[bool, typer.Option("--scene-split", help="Split at scene cuts first.")]
SceneThresholdOpt = Annotated[float, typer.Option(help="ContentDetector threshold (VBench-Long: 35).")]
ClipSecondsOpt = Annotated[float | None, typer.Option(
    help="Clip length for every dimension (default 2 s; 10 s for human_action, temporal_style, "
         "overall_consistency).")]
ClipSourceOpt = Annotated[str, typer.Option(
    help="frames (decoded frames of each span) or reencoded (VBench-Long's H.264 clip files).")]
DevFlagOpt = Annotated[bool, typer.Option("--dev-flag/--no-dev-flag", help="VBench-Long's slow-fast fusion "
                                          "weights 0.5/0.5 (evaluate_long.sh); off: in-clip only.")]
CacheDirOpt = Annotated[str | None, typer.Option(help="VBench weights (default VBENCH_CACHE_DIR or ~/.cache/vbench).")]
EvalDeviceOpt = Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when visible).")]
CompareOpt = Annotated[bool, typer.Option("--compare", help="Compare the results.json files given.")]
SuiteOpt = Annotated[str | None, typer.Option(help="Generate and score a suite: vbench, or shapes.")]
PromptFileOpt = Annotated[str | None, typer.Option(help="Generate from prompts: .txt or VBench .json.")]
SamplesOpt = Annotated[int | None, typer.Option(help="Videos per prompt (default 5; 25 for flickering).")]
SampleSeedOpt = Annotated[int, typer.Option(help="Seed of sample 0; sample i uses seed + i.")]
VideosDirOpt = Annotated[str | None, typer.Option(help="Where generated videos go (default <out>_videos).")]
EnvDirOpt = Annotated[str | None, typer.Option(help="VBench environment (default ~/.cache/longlive/vbench-env).")]
GenRecipeOpt = Annotated[str | None, typer.Option(help="Generation recipe.")]
GenSetOpt = Annotated[list[str] | None, typer.Option("--set", help="Recipe override key=value.")]
GenModelDirOpt = Annotated[str | None, typer.Option(help="Generation model folder.")]
GenCheckpointOpt = Annotated[str | None, typer.Option(help="Generator weights.")]
GenLoraOpt = Annotated[str | None, typer.Option(help="LoRA to merge.")]
MaxPromptsOpt = Annotated[int | None, typer.Option(help="Only this many of the suite's prompts (a quick check; "
                                                   "shapes: balanced seen / held out).")]


@app.command("eval-vbench")
def eval_vbench(
    inputs: InputsArg = None, out: OutOpt = None, mode: ModeOpt = "long", dimensions: DimensionsOpt = None,
    scene_split: SceneSplitOpt = False, scene_threshold: SceneThresholdOpt = 35.0,
    clip_seconds: ClipSecondsOpt = None, clip_source: ClipSourceOpt = "frames", dev_flag: DevFlagOpt = True,
    cache_dir: CacheDirOpt = None, device: EvalDeviceOpt = None, compare_runs: CompareOpt = False,
    suite: SuiteOpt = None, prompt_file: PromptFileOpt = None, samples: SamplesOpt = None,
    seed: SampleSeedOpt = 0, videos_dir: VideosDirOpt = None, env_dir: EnvDirOpt = None,
    preset: GenPresetOpt = None, recipe: GenRecipeOpt = None, set_: GenSetOpt = None,
    model_dir: GenModelDirOpt = None, checkpoint: GenCheckpointOpt = None, lora: GenLoraOpt = None,
    steps: GenStepsOpt = None,
    precision: PrecisionOpt = None, quant_mode: QuantModeOpt = None, kv_precision: KvPrecisionOpt = None,
    seconds: GenSecondsOpt = None, random_weights: RandomWeightsOpt = False, max_prompts: MaxPromptsOpt = None,
) -> None:
    """Score videos with VBench / VBench-Long (the vbench package's own metrics), or generate a prompt suite first."""
    from core.eval.environment import DEFAULT_ENV_DIR, worker_python
    from core.eval.weights import check_weights, resolve_cache_dir

    if compare_runs:
        return compare(inputs or [])
    if out is None:
        raise UserError("--out results.json is required")
    target = check_out(out)
    gen = GenerationOptions(preset, recipe, tuple(set_ or ()), model_dir, checkpoint, lora, steps, precision,
                            quant_mode, kv_precision, seconds, check_device(device or _default_device()),
                            random_weights)
    if suite is not None and suite != "vbench" and prompt_file is None:
        return run_external_suite(suite, target, gen.device, dimensions, gen, max_prompts=max_prompts, seed=seed,
                                  videos_dir=videos_dir, extra_inputs=bool(inputs) or samples is not None)
    generating = suite is not None or prompt_file is not None
    if generating == bool(inputs):
        raise UserError("give videos (files or folders) or --suite / --prompt-file, not both" if inputs else
                        "nothing to evaluate: give mp4 files or folders, or --suite vbench / --prompt-file FILE")
    chosen = parse_dimensions(dimensions, mode, generating)
    settings = _settings(mode, chosen, scene_split, scene_threshold, clip_seconds, clip_source, dev_flag, gen.device)
    if not generating:
        check_custom_input(chosen)
        videos = collect_videos(inputs)
    cache = resolve_cache_dir(cache_dir)
    check_weights(chosen, cache, settings.mode, settings.dev_flag)
    python = worker_python(Path(env_dir).expanduser() if env_dir else DEFAULT_ENV_DIR)
    if not generating:
        return evaluate(videos, settings, cache, python, target, {"source": "videos"}) and None
    _run_suite(suite, prompt_file, samples, seed, videos_dir, gen, settings, cache, python, target, max_prompts)


def download_eval(cache_dir: str | None, dimensions: str | None, env_only: bool, env_dir: str | None,
                  dry_run: bool) -> None:
    """`longlive download --eval`: the VBench environment (pip, PyPI), then VBench's weights."""
    import torch

    from core.eval.environment import DEFAULT_ENV_DIR, install_env, torch_pair
    from core.eval.weights import fetch, required_files, resolve_cache_dir

    console = Console()
    chosen = parse_dimensions(dimensions, "standard", True)
    cache = resolve_cache_dir(cache_dir)
    files = [] if env_only else required_files(chosen, "long", True)
    pins = torch_pair(torch.__version__)
    console.print(f"VBench environment: {env_dir or DEFAULT_ENV_DIR} ({' '.join(pins)})", highlight=False)
    for item in files:
        state = "present" if (cache / item.path).exists() else item.url
        console.print(f"  {cache / item.path}: {state}", highlight=False, soft_wrap=True)
    if dry_run:
        return
    install_env(Path(env_dir).expanduser() if env_dir else DEFAULT_ENV_DIR, pins, log=console.print)
    for item in files:
        try:
            fetch(item, cache)
        except OSError as err:
            raise UserError(f"cannot download {item.url} ({type(err).__name__}: {str(err)[:120]}): fetch it on a "
                            f"machine with network access and copy it to {cache / item.path}") from None
    console.print(f"[green]done:[/] VBench weights in {cache}" if files else "[green]done[/]")
