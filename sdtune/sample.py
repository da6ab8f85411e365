"""``sdtune sample``: images, X/Y grids and base-vs-fine-tune comparisons from a model and LoRAs.

    sdtune sample --model BASE [--lora FILE[:WEIGHT] ...] --prompt "..." --out DIR
    sdtune sample --model BASE --lora my.safetensors --prompt "..." --grid x=steps:10,20,40 y=cfg:3,7,11 --out DIR
    sdtune sample --model BASE --lora my.safetensors --prompt-file prompts.txt --compare --out DIR

The arguments become a list of ``Job``s (one image each), run in batches
(``sdtune.pipeline`` loads the model and LoRAs, ``sdtune.samplers`` draws), and
written as PNGs carrying A1111-format parameters (``infotext``).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from sdtune import grid as grids
from sdtune import infotext
from sdtune.hashes import file_sha256
from sdtune.pipeline import Model, load_pipeline, set_lora_weights
from sdtune.samplers import SAMPLER_BY_A1111_NAME, SAMPLERS, ZTSNR_CFG_RESCALE, default_cfg_rescale, generate, make_sampler
from sdtune.textual_inversion import load_into_pipeline


# --- Jobs: one image each, and the infotext that describes it ----------------------------------


@dataclass(frozen=True)
class Job:
    prompt: str
    negative: str
    sampler: str
    steps: int
    cfg: float
    cfg_rescale: float
    seed: int
    width: int
    height: int
    loras: tuple[tuple[str, float], ...] = ()  # (name, weight) of each LoRA of the model
    ddpm_noise: bool = True


_LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([^>]+)>")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def job_parameters(job: Job, model: Model) -> str:
    """The A1111 infotext of ``job``'s image. Active LoRAs appear as ``<lora:name:weight>``
    in the prompt, as A1111 users type them, and in ``Lora hashes``."""
    active = [(name, weight) for name, weight in job.loras if weight != 0]
    hashes = {lora.name: lora.short_hash for lora in model.loras}
    params = {
        "Steps": job.steps,
        "Sampler": SAMPLERS[job.sampler].a1111_name,
        "CFG scale": _number(job.cfg),
        "Seed": job.seed,
        "Size": f"{job.width}x{job.height}",
        "Model hash": model.short_hash,
        "Model": model.name,
        # The name the CFG-rescale extension for A1111 reads.
        "CFG Rescale phi": _number(job.cfg_rescale) if job.cfg_rescale else None,
        "Lora hashes": ", ".join(f"{infotext.lora_alias(n)}: {hashes[n]}" for n, _ in active) or None,
        # A1111 lists the embeddings a prompt uses, by name and the first 12 hex digits of the file's sha256.
        "TI hashes": ", ".join(f"{t}: {h}" for t, h in model.embeddings if t.lower() in job.prompt.lower()) or None,
        "DDPM noise": None if job.ddpm_noise else "off",
        "RNG": "CPU",  # initial noise from torch's CPU generator, as A1111's "CPU" setting draws it
    }
    prompt = job.prompt + "".join(f" <lora:{name}:{_number(weight)}>" for name, weight in active)
    return infotext.format_parameters(prompt, job.negative, params)


def job_from_parameters(text: str) -> Job:
    """Read an infotext back into a ``Job`` (LoRAs: those named in the prompt's tags)."""
    prompt, negative, params = infotext.parse_parameters(text)
    loras = tuple((name, float(weight)) for name, weight in _LORA_TAG.findall(prompt))
    width, _, height = params["Size"].partition("x")
    sampler = params["Sampler"]
    if sampler not in SAMPLER_BY_A1111_NAME:
        raise ValueError(f"sampler {sampler!r} is not one sdtune has; it has {', '.join(SAMPLER_BY_A1111_NAME)}")
    return Job(
        prompt=_LORA_TAG.sub("", prompt).strip(),
        negative=negative,
        sampler=SAMPLER_BY_A1111_NAME[sampler],
        steps=int(params["Steps"]),
        cfg=float(params["CFG scale"]),
        cfg_rescale=float(params.get("CFG Rescale phi", 0)),
        seed=int(params["Seed"]),
        width=int(width),
        height=int(height),
        loras=loras,
        ddpm_noise=params.get("DDPM noise") != "off",
    )


def run_jobs(models: list[Model], tasks: list[tuple[int, Job]], batch_size: int, progress=None) -> dict:
    """Generate each ``(model index, job)`` once, in batches of jobs that differ only
    in prompt and seed; returns ``{task: image}``."""
    def setting(task):
        m, job = task
        return (m, job.loras, job.sampler, job.steps, job.cfg, job.cfg_rescale, job.width, job.height, job.ddpm_noise)

    groups: dict[tuple, list] = {}
    for task in dict.fromkeys(tasks):  # each task once, in first-seen order
        groups.setdefault(setting(task), []).append(task)
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    images = {}
    for batch in batches:
        m, job = batch[0]
        model = models[m]
        set_lora_weights(model, tuple(weight for _, weight in job.loras))
        sampler = make_sampler(job.sampler, model.sampling_config, job.ddpm_noise)
        out = generate(
            model.pipe, [j.prompt for _, j in batch], sampler, job.steps, job.cfg, job.cfg_rescale,
            [j.seed for _, j in batch], (job.width, job.height), [j.negative for _, j in batch],
        )
        images.update(zip(batch, out))
        if progress is not None:
            progress.update(len(batch))
    return images


def apply_axis(job: Job, axis: str, value) -> Job:
    if axis == "lora":
        if not job.loras:
            raise ValueError("grid axis lora needs at least one --lora")
        return dataclasses.replace(job, loras=tuple((name, value) for name, _ in job.loras))
    if axis == "sampler" and value not in SAMPLERS:
        raise ValueError(f"grid axis sampler: unknown sampler {value!r}; choose from {', '.join(SAMPLERS)}")
    return dataclasses.replace(job, **{axis: value})


# --- The command ----------------------------------------------------------------------------------


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]``; a colon that is part of the path (``C:\\x``) is kept."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def parse_embedding_arg(text: str) -> tuple[str, str | None]:
    """``FILE[:TOKEN]``; a colon that is part of an existing file's path is kept."""
    path, sep, token = text.rpartition(":")
    return (path, token or None) if sep and not Path(text).is_file() and "/" not in token and "\\" not in token else (text, None)


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or int(match[1]) % 8 or int(match[2]) % 8:
        raise ValueError(f"--size {text!r}: write WxH with both multiples of 8 (the VAE downsamples 8x), e.g. 512x512")
    return int(match[1]), int(match[2])


def next_index(out: Path) -> int:
    """A1111-style numbering: new images continue after the highest ``NNNNN-`` in the folder."""
    numbers = [int(m[1]) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdtune sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base model: a diffusers folder or a single-file .safetensors checkpoint")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="LoRA file (kohya or diffusers), weight 1 unless given; repeatable")
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                        help="textual-inversion embedding (A1111/ComfyUI .safetensors), used where a prompt names TOKEN (default: the file's stem, as in A1111); repeatable")
    parser.add_argument("--prompt", action="append", default=[], help="prompt; repeatable")
    parser.add_argument("--prompt-file", help="file of prompts, one a line (blank lines skipped)")
    parser.add_argument("--negative", default="", help="negative prompt, for every image")
    parser.add_argument("--sampler", default="euler_a", choices=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    parser.add_argument("--cfg-rescale", type=float, default=None, help="guidance rescale phi (default: 0.7 for a zero-terminal-SNR model, else 0)")
    parser.add_argument("--seed", type=int, default=-1, help="seed of the first image; each prompt's N images use seed..seed+N-1 (default: random)")
    parser.add_argument("--n", type=int, default=1, help="images per prompt")
    parser.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="image size (default: the model's native size)")
    parser.add_argument("--grid", nargs="+", metavar="x=AXIS:V1,V2", help="X/Y plot: x=steps:10,20,40 [y=cfg:3,7,11]; axes: " + ", ".join(grids.AXES))
    parser.add_argument("--compare", nargs="?", const=True, default=None, metavar="BASE",
                        help="base vs fine-tune side by side, same seeds: alone, the LoRAs off vs on; with a model folder, that base vs --model")
    parser.add_argument("--ddpm-no-noise", action="store_true",
                        help="teaching switch: DDPM without its per-step noise (samples collapse toward the mean); needs --sampler ddpm")
    parser.add_argument("--allow-pickle", action="store_true", help="read pickled weights (.ckpt, .bin, .pt) as tensors only (torch.load weights_only=True)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", required=True, help="output folder (existing images are kept; numbering continues)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    diffusers_logging.disable_progress_bar()  # per-component "Loading" bars hide ours
    transformers_logging.disable_progress_bar()
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line.strip() for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    axes = _grid_axes(args.grid or [])
    if not prompts and not any(a.name == "prompt" for a in axes.values()):
        raise ValueError("nothing to generate: give --prompt, --prompt-file or a grid axis prompt:...")
    if args.grid and args.compare:
        raise ValueError("--grid and --compare each write one grid; use one at a time")
    if args.n < 1 or args.steps < 1 or args.batch_size < 1:
        raise ValueError("--n, --steps and --batch-size must be at least 1")

    loras = [parse_lora_arg(text) for text in args.lora]
    models = [load_pipeline(args.model, [path for path, _ in loras], allow_pickle=args.allow_pickle)]
    if isinstance(args.compare, str):
        models.append(load_pipeline(args.compare, allow_pickle=args.allow_pickle))
    elif args.compare and not loras:
        raise ValueError("--compare alone compares the LoRAs off and on; add --lora FILE, or name a base model: --compare BASE")
    model = models[0]
    for path, token in map(parse_embedding_arg, args.embedding):
        model.embeddings.append((load_into_pipeline(model.pipe, path, token, args.allow_pickle), file_sha256(Path(path))[:12]))
        print(f"sdtune: embedding {path} as {model.embeddings[-1][0]!r}")
    _report_flags(model)
    seed = args.seed if args.seed >= 0 else random.randrange(2**32)
    width, height = args.size or _native_size(model.pipe)
    base = Job(
        prompt=prompts[0] if prompts else "",
        negative=args.negative,
        sampler=args.sampler,
        steps=args.steps,
        cfg=args.cfg,
        cfg_rescale=args.cfg_rescale if args.cfg_rescale is not None else default_cfg_rescale(model.zero_terminal_snr),
        seed=seed,
        width=width,
        height=height,
        loras=tuple((lora.name, weight) for lora, (_, weight) in zip(model.loras, loras)),
        ddpm_noise=not args.ddpm_no_noise,
    )
    make_sampler(base.sampler, model.sampling_config, base.ddpm_noise)  # a bad combination fails before any work
    starts = [dataclasses.replace(base, prompt=p, seed=seed + i) for p in (prompts or [""]) for i in range(args.n)]

    # A figure is rows x columns of (model index, job) with column and row labels.
    figures: list[tuple[list[list[tuple[int, Job]]], list[str], list[str]]] = []
    if axes:
        if any(axis.name == "prompt" for axis in axes.values()):
            starts = starts[: args.n]  # the axis supplies the prompts
        figures = [_axes_figure(start, axes) for start in starts]
    elif args.compare:
        figures = [_compare_figure(starts, models)]
    tasks = [task for rows, _, _ in figures for row in rows for task in row] or [(0, job) for job in starts]

    with tqdm(total=len(set(tasks)), unit="image", desc="sampling") as bar:
        images = run_jobs(models, tasks, args.batch_size, bar)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = next_index(out)
    written, parameters = [], {}
    for task in dict.fromkeys(tasks):  # first-seen order, each image once
        m, job = task
        parameters[task] = job_parameters(job, models[m])
        written.append(infotext.save_png(images[task], out / f"{index:05d}-{job.seed}.png", parameters[task]))
        index += 1
    kind = "grid" if axes else "compare"
    for rows, column_labels, row_labels in figures:
        figure = grids.draw_grid([[images[task] for task in row] for row in rows], column_labels, row_labels)
        number = next(n for n in range(10**4) if not (out / f"{kind}-{n:04d}.png").exists())
        # A1111 stores the first cell's parameters with a grid.
        written.append(infotext.save_png(figure, out / f"{kind}-{number:04d}.png", parameters[rows[0][0]]))
    print(f"sdtune: wrote {len(parameters)} image(s) to {out}")
    for path in written[len(parameters) :]:
        print(f"sdtune: {kind} {path}")
    return written


def _grid_axes(specs: list[str]) -> dict[str, grids.Axis]:
    axes = {}
    for spec in specs:
        which, sep, rest = spec.partition("=")
        if not sep or which not in ("x", "y") or which in axes:
            raise ValueError(f"--grid {spec!r}: write x=AXIS:V1,V2,... and optionally y=AXIS:V1,V2,..., once each")
        axes[which] = grids.parse_axis(rest)
    if axes and "x" not in axes:
        raise ValueError("--grid needs an x= axis")
    if len(axes) == 2 and axes["x"].name == axes["y"].name:
        raise ValueError(f"--grid x and y both vary {axes['x'].name}; choose two different axes")
    return axes


def _axes_figure(start: Job, axes: dict[str, grids.Axis]):
    x, y = axes["x"], axes.get("y")
    row_values = y.values if y else (None,)
    rows = [
        [(0, apply_axis(apply_axis(start, y.name, yv) if y else start, x.name, xv)) for xv in x.values]
        for yv in row_values
    ]
    return rows, [grids.axis_label(x, v) for v in x.values], [grids.axis_label(y, v) for v in y.values] if y else []


def _compare_figure(starts: list[Job], models: list[Model]):
    """Rows of (base, fine-tune) for the same job. The base is a second model when one
    was named, else the same model with its LoRAs at weight 0, which is the base exactly."""
    fine_tune = models[0]
    if len(models) > 1:
        base = [(1, dataclasses.replace(job, loras=())) for job in starts]
        labels = [f"base: {models[1].name}", f"fine-tune: {fine_tune.name}"]
    else:
        base = [(0, dataclasses.replace(job, loras=tuple((name, 0.0) for name, _ in job.loras))) for job in starts]
        labels = [f"base: {fine_tune.name}", f"fine-tune: {' + '.join(lora.name for lora in fine_tune.loras)}"]
    rows = [[left, (0, job)] for left, job in zip(base, starts)]
    return rows, labels, [f"seed {job.seed}: {job.prompt}" for job in starts]


def _native_size(pipe: StableDiffusionPipeline) -> tuple[int, int]:
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def _report_flags(model: Model) -> None:
    if model.zero_terminal_snr:
        how = f"{model.prediction_type} with zero terminal SNR (trailing timesteps, CFG rescale {ZTSNR_CFG_RESCALE} unless --cfg-rescale)"
    else:
        how = model.prediction_type
    print(f"sdtune: sampling {model.name} as {how}, from {model.flags_from}")

