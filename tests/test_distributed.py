"""Data-parallel training on two CPU processes (gloo), against one process.

The batch order is sharded, not changed: with ``P`` processes, step ``s`` trains
global batches ``s*P .. s*P+P-1``, and a batch's randomness is keyed by its place in
that order. So two processes with batch B train the same model as one process with
batch B and 2 accumulation steps; only the order of the floating-point sums differs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest
import torch
from accelerate.utils import load as accelerate_load
from conftest import ROOT, cpu_processes, free_port

from sdtune import training_state
from sdtune.errors import UserError
from sdtune.export.kohya import read_lora
from sdtune.train import main

STEPS = 20
# The two runs sum the same gradients in another order (all-reduce vs. accumulation), so
# they agree to float rounding, not bit for bit. After 20 steps the LoRA up weights
# (zero at the start) have grown to ~1e-2; a tolerance 1000x below that cannot hide a
# run that trained on other batches or other noise.
TOLERANCE = 1e-5


def _recipe(model, data, out, cache, batch_size: int, accumulation: int, *extra) -> list[str]:
    args = ["--recipe", "recipes/tiny_demo.yaml"]
    for item in (
        f"model.path={model}", f"data.path={data}", f"data.cache_dir={cache}", f"output.dir={out}", "train.logger=none",
        "preview.prompts=[]", "data.validation_split=0", "export.dtype=fp32", "train.deterministic=true",
        f"train.batch_size={batch_size}", f"train.gradient_accumulation_steps={accumulation}", f"train.max_steps={STEPS}",
        "train.lr_scheduler=cosine", "train.lr_warmup_steps=3", "ema.enabled=true", "ema.decay=0.9",
        "data.caption_dropout=0.3", "train.noise_offset=0.05", *extra,
    ):
        args += ["--set", item]
    return args


def _two_processes(args: list[str]) -> subprocess.Popen:
    command, env = cpu_processes(2, str(ROOT / "sdtune" / "train.py"), *args)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)


def _lora(path) -> dict[str, torch.Tensor]:
    return read_lora(path)[0]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_train_like_one_stop_together_and_resume_exactly(tiny_v, small_dataset, tmp_path):
    cache = tmp_path / "cache"
    # One process, batch 2 x 2 accumulation steps: the global batch of 2 processes x batch 2.
    one = _lora(main(_recipe(tiny_v, small_dataset, tmp_path / "one", cache, 2, 2)).output)
    assert max(t.abs().max().item() for k, t in one.items() if "lora_up" in k) > 100 * TOLERANCE

    # Two processes, uninterrupted, as launch.sh starts them without a GPU.
    recipe = _recipe(tiny_v, small_dataset, tmp_path / "two", cache, 2, 1, "checkpoint.every_steps=10")
    run = subprocess.run(["bash", "launch.sh", "train", *recipe[1:2], "--processes", "2", "--main_process_port", str(free_port()),
                          *recipe[2:]], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"SDTUNE_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"})
    stdout, stderr = run.stdout, run.stderr
    assert run.returncode == 0, stderr[-3000:]
    assert "sdtune: launching: ACCELERATE_USE_CPU=1 " in stderr and " --multi_gpu --num_processes 2 " in stderr
    assert stdout.count("process(es) on cpu") == 1  # one run of two processes, not two runs of one
    assert "; 2 process(es) on cpu" in stdout and "effective batch 4 = batch 2 x 2 process(es) x 1 accumulation step(s)" in stdout
    two = _lora(tmp_path / "two" / "tiny-demo.safetensors")
    assert _max_difference(two, one) < TOLERANCE, _max_difference(two, one)
    # Only the main process wrote: the result once, one record, checkpoints with both RNGs.
    assert stdout.count("sdtune: wrote ") == 2 and stdout.count("tiny-demo.safetensors\n") == 1  # LoRA + report
    assert json.loads((tmp_path / "two" / "tiny-demo.run.json").read_text())["status"] == "finished"
    checkpoints = training_state.list_checkpoints(tmp_path / "two" / "checkpoints" / "tiny-demo")
    assert [p.name for p in checkpoints] == ["step-00000010"]
    files = {p.name: p.stat().st_size for p in checkpoints[0].iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "optimizer.bin", "trainable.safetensors", "ema.pt"} <= files.keys()
    assert not any(name.startswith("model") for name in files)  # a LoRA checkpoint holds the LoRA, not the UNet

    # SIGTERM to the launcher: both processes stop after the same step, with one checkpoint.
    args = _recipe(tiny_v, small_dataset, tmp_path / "stopped", cache, 2, 1)
    proc = _two_processes(args)
    seen = bytearray()
    reader = threading.Thread(target=lambda: [seen.extend(c) for c in iter(lambda: proc.stderr.read(1), b"")], daemon=True)
    reader.start()
    deadline = time.time() + 240
    while not re.search(rb"training: .*\| *[1-9]\d*/20", bytes(seen)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=120)[0].decode()
    reader.join(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + bytes(seen).decode(errors="replace")[-3000:]
    stopped_at = int(re.search(r"stopped by signal 15 after step (\d+)", stdout).group(1))
    assert 0 < stopped_at < STEPS
    saved = training_state.resolve("latest", tmp_path / "stopped" / "checkpoints" / "tiny-demo")
    assert saved.name == f"step-{stopped_at:08d}" and json.loads((saved / "position.json").read_text())["processes"] == 2
    # Each process saved its own RNG there, at the same step (accelerate records its step counter).
    steps = {accelerate_load(saved / f"random_states_{rank}.pkl")["step"] for rank in (0, 1)}
    assert steps == {stopped_at}

    # Resumed with two processes, it ends where the uninterrupted run did, bit for bit.
    proc = _two_processes([*args, "--resume", "latest"])
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=300))
    assert proc.returncode == 0, stderr[-3000:]
    assert f"resumed from {saved} at step {stopped_at}" in stdout
    resumed = _lora(tmp_path / "stopped" / "tiny-demo.safetensors")
    assert all(torch.equal(resumed[k], two[k]) for k in two)

    # One process cannot take over a two-process checkpoint: it would change the batch order.
    with pytest.raises(UserError, match=r"written by a run of 2 process\(es\); this one has 1"):
        main([*_recipe(tiny_v, small_dataset, tmp_path / "stopped", cache, 2, 1, "train.max_steps=40"), "--resume", "latest"])


def test_an_engine_accelerate_drops_on_cpu_is_said(monkeypatch, capsys, tmp_path):
    """accelerate turns FSDP into plain DDP on CPU processes without a word; sdtune says so."""
    from sdtune.compute import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    accelerator = make_accelerator("no", 1, "none", tmp_path, 0, False)
    assert accelerator.distributed_type.value == "NO"
    assert "sdtune: warning: FSDP was asked for, but accelerate runs a single process on cpu" in capsys.readouterr().err
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    make_accelerator("no", 1, "none", tmp_path, 0, False)
    assert "warning" not in capsys.readouterr().err


def test_fsdp2_is_refused_until_proven_fsdp1_runs():
    """tests/test_fsdp.py proves FSDP1 on CPU processes (tests/test_deepspeed.py DeepSpeed ZeRO-1/2); FSDP2 is not proven."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from sdtune.compute import _check_engine

    def accelerator(engine, version=1):
        plugin = SimpleNamespace(fsdp_version=version, sharding_strategy=SimpleNamespace(name="FULL_SHARD"),
                                 state_dict_type=SimpleNamespace(name="SHARDED_STATE_DICT"), use_orig_params=True)
        return SimpleNamespace(distributed_type=engine, is_local_main_process=True, state=SimpleNamespace(fsdp_plugin=plugin))

    with pytest.raises(UserError, match=r"accelerate runs FSDP2 \(fsdp_version: 2\), which sdtune does not support yet.*fsdp.yaml.*multi_gpu.yaml"):
        _check_engine(accelerator(DistributedType.FSDP, 2))
    _check_engine(accelerator(DistributedType.FSDP))
