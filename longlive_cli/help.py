"""What `--help` shows beyond the options: examples for every subcommand, plain boolean flags.

The examples live here, in one table, so each command module stays about its options; they are
attached to the built click command by `finish_help`; a new subcommand adds its entry here.
"""

from __future__ import annotations

from rich.markup import escape

# 2-4 runnable examples per subcommand, most common first (a comment after "#"), each short enough
# for one line of a 100-column terminal.
EXAMPLES: dict[str, list[str]] = {
    "generate": [
        'longlive generate "a red ball bounces on a wooden floor" --preset tiny -o demo.mp4  # CPU',
        'longlive generate "a corgi surfing at sunset" --seconds 20 -o corgi.mp4',
        'longlive generate "the corgi jumps" --image corgi.png --steps 2 --seed 7 -o jump.mp4',
        'longlive generate "a city at night" --checkpoint nvfp4.safetensors --precision nvfp4',
    ],
    "multishot": [
        "longlive multishot shots.yaml -o story.mp4                # prompt + seconds per shot",
        "longlive multishot prompts.txt --seconds 30 -o story.mp4  # a prompt per line, split evenly",
        "longlive multishot prompts.txt --seconds 60 --interactive  # type a prompt, Enter switches",
        "longlive multishot shots.yaml --decode device:1 --latents-out story.safetensors",
    ],
    "bench": [
        "longlive bench                                   # 5B, 720p, 4 steps (needs a GPU)",
        "longlive bench --steps 2 --json                  # the 2-step sampler, machine-readable",
        "longlive bench --preset tiny --device cpu        # anywhere",
        "longlive bench --decode device:1                 # end to end, the VAE on a second GPU",
    ],
    "convert-nvfp4": [
        "longlive convert-nvfp4 model_bf16.pt model_nvfp4.safetensors --device cuda",
        "longlive convert-nvfp4 model_bf16.pt model_nvfp4.safetensors --lora lora.pt --rule mse",
        "longlive convert-nvfp4 model_4o6.pt model_nvfp4.safetensors   # import an official NVFP4 export",
    ],
    "download": [
        "longlive download --dry-run                      # list the files and sizes",
        "longlive download                                # ~24 GB into ~/.cache/longlive/models",
        "longlive download --what generator --local-dir /models",
        "longlive download --eval                         # VBench environment + weights (eval-vbench)",
    ],
    "distill": [
        "longlive distill distill_tiny --logdir runs/dt --export-lora lora.safetensors  # CPU",
        "longlive distill distill --nproc-per-node 8 --set data.path=/data --export-lora lora.pt",
        "longlive distill distill --logdir runs/d --max-steps 600 --merge-into merged.pt  # continues",
        "longlive distill distill_nvfp4 --nproc-per-node 8 --set stream.sampling_steps=2  # 2 steps",
    ],
    "eval-vbench": [
        "longlive eval-vbench videos/ --out results/bf16.json --scene-split    # score mp4s",
        "longlive eval-vbench --suite vbench --mode standard --out results/nvfp4.json --precision nvfp4",
        "longlive eval-vbench --compare results/bf16.json results/nvfp4.json",
        "longlive eval-vbench --suite shapes --preset tiny --out results/shapes.json  # offline",
    ],
    "train-ar": [
        "longlive train-ar train_ar_tiny --logdir runs/tiny                 # CPU, generated data",
        "longlive train-ar train_ar_tiny --logdir runs/tiny --max-steps 200 # continues the run",
        "longlive train-ar train_ar --nproc-per-node 4 --set data.path=/data --set train.init=gen.pt",
        "longlive train-ar train_ar_tiny --logdir runs/t2 --export tiny.safetensors --no-resume",
    ],
    "train-vae": [
        "longlive train-vae train_vae_shapes --logdir runs/vae --export vae.safetensors  # shapes VAE",
        "longlive train-vae train_vae_shapes --logdir runs/vae --max-steps 3000  # continues the run",
        "longlive train-vae train_vae_shapes --set runtime.device=cuda --set data.batch_size=16",
    ],
}


def examples_epilog(examples: list[str]) -> str:
    """The epilog text of a command's examples (rich markup escaped)."""
    return "\n".join(["[bold]Examples[/bold]", *(f"  {escape(example)}" for example in examples)])


def plain_flags(command) -> None:
    """Boolean flags take no value: show none (typer prints a `<bool>` type, even for --help)."""
    context = command.context_class(command, info_name=command.name)
    for param in command.get_params(context):  # includes the help option
        if param.param_type_name == "option" and param.is_flag:
            param.metavar = ""


def finish_help(group) -> None:
    """Examples and plain flags for the app's click group and every subcommand in it."""
    plain_flags(group)
    for name, command in group.commands.items():
        if name in EXAMPLES and not command.epilog:
            command.epilog = examples_epilog(EXAMPLES[name])
        plain_flags(command)
