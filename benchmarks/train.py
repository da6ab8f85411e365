"""Training speed: a real `sdtune.train` run, then a bare loop on the same UNet.

    python benchmarks/train.py --model tiny|sd15 [--recipe recipes/tiny_demo.yaml] [--steps 30] [--warmup 5]
        [--resolution R] [--batch-size B] [--model-dir DIR] [--set section.key=value ...]

Trains the recipe's LoRA on a copy of datasets/sample from an empty latent cache
(previews, validation, logging and checkpoints off; --set applies last) and
prints one JSON object:

  s_per_step_median        time between the ends of consecutive optimizer steps after
                           --warmup (a hook on the run's optimizer): all the loop does
  floor_s_per_step_median  then the trained UNet with its LoRA, in the run's dtype, in a
                           bare loop (forward, MSE, backward, AdamW, zero_grad), one step
                           per batch of the run at its latent shape (buckets differ in
                           shape, and a bucket's last batch may be short)
  overhead                 s_per_step_median / floor - 1; cpu_overhead is the same in
                           this process's CPU seconds, which other jobs disturb less
  flops_per_step           the model FLOPs of a step's forward + backward at the run's latent
                           shapes (torch.utils.flop_counter: matrix products, convolutions,
                           attention), mean over the timed steps; achieved_tflops = that /
                           s_per_step_median; mfu = achieved / peak_tflops, the device's dense
                           bf16/fp16 peak (datasheet, for the GPUs in PEAK_TFLOPS, or
                           --peak-tflops), null where neither gives one
  start_to_first_step_s    process start (/proc/self/stat) to the end of step 1: imports,
                           this script's setup (setup_s: model folder, copying the images),
                           scan, model load, cache fill (cache_fill_s, latents and
                           captions; cache_images_per_s = latents / cache_fill_s), LoRA setup

`tiny` is sdtune.tiny's model at the recipe's resolution; `sd15` is SD 1.5's topology
at full width (UNet 859M parameters) with random weights, at 512 px on a GPU and 256
on a CPU unless --resolution says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed copy

import torch
import torch.nn.functional as F

import sdtune.loop
import sdtune.train
from sdtune import atomic
from sdtune.data.cache import fill_caches
from sdtune.diffusion import denoising_loss
from sdtune.models import DTYPES
from sdtune.optim import make_optimizer
from sdtune.recipe import load_recipe
from sdtune.tiny import make_tiny

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "datasets" / "sample"


def process_age_s() -> float:
    """Seconds since this process started, from the kernel's start time (10 ms resolution)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks after boot
    return float(Path("/proc/uptime").read_text().split()[0]) - started


def stamp(device: torch.device) -> tuple[float, float]:
    """(wall, this process's CPU) seconds, after queued GPU work: the CPU time is what other
    jobs on a shared machine change least, the wall time what a user waits."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def build_sd15(folder: Path) -> None:
    """SD 1.5 at full width with random weights, as a diffusers folder: the shipped configs, as
    single files are read (sdtune.export.checkpoint.base_config), initialised by the classes."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtune.export.checkpoint import base_config
    from sdtune.tiny import clip_tokenizer

    configs = base_config("sd_v1")
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=clip_tokenizer(configs["tokenizer"]["pad_token"]),
        unet=UNet2DConditionModel.from_config(configs["unet"]),
        scheduler=DDIMScheduler.from_config(configs["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = atomic.tmp_beside(folder)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        atomic.publish_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_folder(kind: str, folder: Path) -> Path:
    """The model's diffusers folder, built unless an earlier run left it there."""
    if not (folder / "model_index.json").is_file():
        if kind == "tiny":
            make_tiny(folder, "epsilon")
        else:
            build_sd15(folder)
    return folder


class StepClock:
    """A step hook on the run's optimizer: when each optimizer step ended."""

    def __init__(self, device: torch.device):
        self.device, self.ends, self.first_step_age = device, [], None

    def __call__(self, optimizer, args, kwargs) -> None:
        self.ends.append(stamp(self.device))
        if self.first_step_age is None:
            self.first_step_age = process_age_s()


def random_inputs(unet, shape: torch.Size, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A random latent batch of ``shape``, its timesteps and text conditioning."""
    latents = torch.randn(shape, generator=gen, device=device)
    conditioning = torch.randn(shape[0], 77, unet.config.cross_attention_dim, generator=gen, device=device)
    timesteps = torch.randint(0, 1000, (shape[0],), generator=gen, device=device)
    return latents, timesteps, conditioning


def forward_backward(unet, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
    """The UNet's forward under the run's autocast, an MSE against the latents, and its backward."""
    latents, timesteps, conditioning = inputs
    with torch.autocast(latents.device.type, dtype=dtype, enabled=dtype != torch.float32):
        prediction = unet(latents, timesteps, conditioning, return_dict=False)[0]
    F.mse_loss(prediction.float(), latents).backward()


def floor_times(unet, shapes: list[torch.Size], dtype: torch.dtype, device: torch.device, warmup: int) -> list[tuple[float, float]]:
    """Per-step (wall, CPU) times of the least a step can cost on ``unet`` as trained (its LoRA layers
    are what requires grad), one step per latent batch shape of the run, in its order:
    forward, MSE, backward, AdamW (the kernel sdtune.optim picks), zero_grad."""
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=device.type == "cuda" or None)
    gen = torch.Generator(device).manual_seed(0)
    unet.train()
    times = []
    for shape in shapes:
        inputs = random_inputs(unet, shape, device, gen)
        started = stamp(device)
        forward_backward(unet, inputs, dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ended = stamp(device)
        times.append((ended[0] - started[0], ended[1] - started[1]))
    return times[warmup:]


# Dense bf16/fp16 tensor-core peaks from the datasheets, TFLOP/s, by a part of the device's name
# (first match wins): the denominator of MFU for a bf16 or fp16 run.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.1), ("A10G", 125.0))


def peak_tflops(device: torch.device, dtype: torch.dtype, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_TFLOPS if part in name), None)


def step_flops(unet, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> int:
    """Model FLOPs of one forward + backward of ``unet`` on a latent batch of ``shape``, counted by
    torch.utils.flop_counter (what MFU counts: matrix products, convolutions, attention; not the
    forward that gradient checkpointing runs again, so it is counted with checkpointing off)."""
    from torch.utils.flop_counter import FlopCounterMode

    checkpointing = unet.is_gradient_checkpointing
    if checkpointing:
        unet.disable_gradient_checkpointing()

    inputs = random_inputs(unet, shape, device, torch.Generator(device).manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        forward_backward(unet, inputs, dtype)
    unet.zero_grad(set_to_none=True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return counter.get_total_flops()


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), required=True)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny_demo.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians (at least 1)")
    parser.add_argument("--resolution", type=int, help="default: the recipe's (tiny); 512 on a GPU, 256 on a CPU (sd15)")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's train.batch_size")
    parser.add_argument("--model-dir", type=Path, help="where the model is built once and reused (default: a temporary folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a recipe override, applied last")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: PEAK_TFLOPS for known GPUs)")
    args = parser.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps: the first step's start is not timed, and some steps must be left")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolution = args.resolution or (None if args.model == "tiny" else 512 if device.type == "cuda" else 256)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        setup_started = time.perf_counter()
        model = model_folder(args.model, args.model_dir or tmp / args.model)
        data = Path(shutil.copytree(SAMPLE, tmp / "data"))
        setup_s = time.perf_counter() - setup_started
        overrides = [
            f"model.path={model}", f"data.path={data}", f"data.cache_dir={tmp / 'cache'}", f"output.dir={tmp / 'out'}",
            "train.logger=none", "preview.prompts=[]", "data.validation_split=0",
            "checkpoint.every_steps=null", "checkpoint.every_epochs=null", f"train.max_steps={args.steps}",
            "data.max_upscale=16",  # the sample images are 64 to 256 px; speed does not care that they are enlarged
            *([f"data.resolution={resolution}"] if resolution else []),
            *([f"train.batch_size={args.batch_size}"] if args.batch_size else []),
            *args.overrides,
        ]
        recipe = load_recipe(args.recipe, overrides)
        opt = recipe.train
        if opt.gradient_accumulation_steps != 1 or opt.max_steps <= args.warmup:
            raise SystemExit("benchmarks/train.py times one micro-batch per optimizer step: leave "
                             "train.gradient_accumulation_steps at 1 and train.max_steps above --warmup")

        clock, fill_s, shapes = StepClock(device), [], []

        def shape_recorder(unet, scheduler, latents, *a, **kw):
            shapes.append(latents.shape)
            return denoising_loss(unet, scheduler, latents, *a, **kw)

        def timed_optimizer(*a, **kw):
            optimizer = make_optimizer(*a, **kw)
            optimizer.register_step_post_hook(clock)
            return optimizer

        def timed_fill(*a, **kw):
            started = time.perf_counter()
            caches = fill_caches(*a, **kw)
            fill_s.append(time.perf_counter() - started)
            return caches

        with (mock.patch.object(sdtune.train, "make_optimizer", timed_optimizer),
              mock.patch.object(sdtune.train, "fill_caches", timed_fill),
              mock.patch.object(sdtune.loop, "denoising_loss", shape_recorder),
              contextlib.redirect_stdout(sys.stderr)):  # stdout holds the JSON alone
            result = sdtune.train.train(recipe)

        steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(clock.ends, clock.ends[1:])][args.warmup - 1 :]
        dtype = DTYPES[opt.mixed_precision]
        floor = floor_times(result.unet, shapes, dtype, device, args.warmup)
        (step_s, step_cpu), (floor_s, floor_cpu) = ([statistics.median(t) for t in zip(*times)] for times in (steps, floor))
        per_shape = {shape: step_flops(result.unet, shape, dtype, device) for shape in set(shapes[args.warmup :])}
        flops = statistics.mean(per_shape[shape] for shape in shapes[args.warmup :])
        peak = peak_tflops(device, dtype, args.peak_tflops)
        figures = {
            "model": args.model,
            "recipe": args.recipe,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "resolution": recipe.data.resolution,
            "batch": opt.batch_size,
            "steps": opt.max_steps,
            "warmup": args.warmup,
            "images_per_step_mean": sig(statistics.mean(s[0] for s in shapes[args.warmup :])),
            "latent_sides": sorted({f"{s[2]}x{s[3]}" for s in shapes}),
            "s_per_step_median": sig(step_s),
            "floor_s_per_step_median": sig(floor_s),
            "overhead": sig(step_s / floor_s - 1, 3),
            "images_per_s": sig(opt.batch_size / step_s),
            "cpu_s_per_step_median": sig(step_cpu),
            "floor_cpu_s_per_step_median": sig(floor_cpu),
            "cpu_overhead": sig(step_cpu / floor_cpu - 1, 3),
            "flops_per_step": sig(flops),
            "achieved_tflops": sig(flops / step_s / 1e12),
            "peak_tflops": peak,
            "mfu": sig(flops / step_s / 1e12 / peak, 3) if peak else None,
            **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
            "step_times_s": [sig(wall, 3) for wall, _ in steps],
            "floor_times_s": [sig(wall, 3) for wall, _ in floor],
            "start_to_first_step_s": sig(clock.first_step_age),
            "setup_s": sig(setup_s),
            "cache_fill_s": sig(fill_s[0]),
            "cache_latents_encoded": result.latent_cache.encoded,
            "cache_images_per_s": sig(result.latent_cache.encoded / fill_s[0]),
            "unet_params": sum(p.numel() for p in result.unet.parameters()),
            "trainable_params": sum(p.numel() for p in result.unet.parameters() if p.requires_grad),
            "peak_rss_gib": sig(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),  # ru_maxrss is KiB on Linux
            **({"peak_cuda_gib": sig(torch.cuda.max_memory_allocated() / 2**30, 3)} if device.type == "cuda" else {}),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
