"""benchmarks/train.py runs a real training on the tiny model and prints figures that add up."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "train.py"
FIELDS = {
    "model", "recipe", "device", "dtype", "resolution", "batch", "steps", "warmup", "images_per_step_mean", "latent_sides",
    "s_per_step_median", "floor_s_per_step_median", "overhead", "images_per_s", "step_times_s", "floor_times_s",
    "cpu_s_per_step_median", "floor_cpu_s_per_step_median", "cpu_overhead",
    "flops_per_step", "achieved_tflops", "peak_tflops", "mfu",
    "start_to_first_step_s", "setup_s", "cache_fill_s", "cache_latents_encoded", "cache_images_per_s",
    "unet_params", "trainable_params", "peak_rss_gib", "torch", "threads", "cpu_capability",
}  # fmt: skip


def test_training_benchmark_on_the_tiny_model():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny", "--steps", "4", "--warmup", "1", "--batch-size", "4", "--peak-tflops", "2"],
        capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = run.stdout.splitlines()  # sdtune's own messages go to stderr: stdout is the JSON alone
    figures = json.loads(line)
    assert set(figures) == FIELDS | ({"peak_cuda_gib", "gpu"} if figures["device"] == "cuda" else set())
    assert (figures["model"], figures["batch"], figures["steps"], figures["warmup"], figures["resolution"]) == ("tiny", 4, 4, 1, 64)
    assert figures["dtype"] == "float32" and figures["threads"] == 1 and figures["cpu_capability"]
    assert figures["cache_latents_encoded"] == 40  # every sample image, into an empty cache
    assert 0 < figures["trainable_params"] < figures["unet_params"]  # a LoRA on the tiny UNet

    positive = ["s_per_step_median", "floor_s_per_step_median", "cpu_s_per_step_median", "floor_cpu_s_per_step_median",
                "images_per_s", "start_to_first_step_s", "setup_s",
                "cache_fill_s", "cache_images_per_s", "peak_rss_gib", "images_per_step_mean"]
    assert all(figures[name] > 0 for name in positive), {name: figures[name] for name in positive}

    # The medians are of the timed steps: the run's steps after the warm-up, and as many floor steps.
    steps, floor = figures["step_times_s"], figures["floor_times_s"]
    assert len(steps) == len(floor) == 3 and min(steps) > 0 and min(floor) > 0
    assert figures["s_per_step_median"] == pytest.approx(statistics.median(steps), rel=1e-2)
    assert figures["floor_s_per_step_median"] == pytest.approx(statistics.median(floor), rel=1e-2)
    assert steps != floor  # the floor is a loop of its own, not the run's times again

    ratio = figures["s_per_step_median"] / figures["floor_s_per_step_median"]
    assert figures["overhead"] == pytest.approx(ratio - 1, abs=2e-3 * ratio)
    cpu_ratio = figures["cpu_s_per_step_median"] / figures["floor_cpu_s_per_step_median"]
    assert figures["cpu_overhead"] == pytest.approx(cpu_ratio - 1, abs=2e-3 * cpu_ratio)
    assert figures["images_per_s"] == pytest.approx(figures["batch"] / figures["s_per_step_median"], rel=2e-3)
    assert figures["cache_images_per_s"] == pytest.approx(40 / figures["cache_fill_s"], rel=2e-3)
    assert figures["flops_per_step"] > 0
    assert figures["achieved_tflops"] == pytest.approx(figures["flops_per_step"] / figures["s_per_step_median"] / 1e12, rel=2e-3)
    assert figures["peak_tflops"] == 2.0 and figures["mfu"] == pytest.approx(figures["achieved_tflops"] / 2.0, rel=2e-3)
    # Step 1 comes after the benchmark's setup and the cache fill, both counted from the process start.
    assert figures["start_to_first_step_s"] > figures["setup_s"] + figures["cache_fill_s"]


def test_warmup_must_leave_steps_to_time(capsys):
    spec = importlib.util.spec_from_file_location("train_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for bad in (["--warmup", "0"], ["--steps", "3", "--warmup", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            module.parse_args(["--model", "tiny", *bad])
        assert exit_info.value.code == 2
        assert "--warmup" in capsys.readouterr().err


def test_step_flops_count_the_backward_and_scale_with_the_batch():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdtune.adapters import add_lora
    from sdtune.tiny import tiny_unet

    spec = importlib.util.spec_from_file_location("train_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    unet = tiny_unet()
    add_lora(unet, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"])
    cpu = torch.device("cpu")
    one, two = (module.step_flops(unet, torch.Size([b, 4, 8, 8]), torch.float32, cpu) for b in (1, 2))
    assert two == 2 * one
    with FlopCounterMode(display=False) as forward_only, torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, unet.config.cross_attention_dim))
    assert one > 1.5 * forward_only.get_total_flops()  # the backward is counted too (input gradients at least)
    assert all(p.grad is None for p in unet.parameters())  # it leaves no gradient behind
    unet.enable_gradient_checkpointing()  # model FLOPs: the recomputed forward is not the model's
    assert module.step_flops(unet, torch.Size([1, 4, 8, 8]), torch.float32, cpu) == one and unet.is_gradient_checkpointing
    assert module.peak_tflops(cpu, torch.bfloat16, None) is None and module.peak_tflops(cpu, torch.bfloat16, 3.5) == 3.5


def test_gpu_scripts_parse_and_every_wheel_is_pinned_by_the_locks():
    import re

    wheels = (ROOT / "benchmarks" / "gpu_wheels.sh").read_text()
    names = re.search(r"names=\(([^)]*)\)", wheels).group(1).split()
    locks = [(ROOT / "requirements" / f"{kind}.lock").read_text().splitlines() for kind in ("run", "test")]
    lock = {line.split("==")[0].lower() for lines in locks for line in lines if "==" in line}
    assert {"diffusers", "transformers", "peft", "accelerate", "pydantic", "ninja"} <= set(names)  # ninja: DeepSpeed's ops
    assert [n for n in names if n.lower() not in lock] == []
    for script in ("gpu_wheels.sh", "gpu_setup.sh", "gpu_check.sh", "gpu_fsdp.sh"):
        check = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
