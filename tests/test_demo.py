"""The README's first command, `bash launch.sh`, end to end (setup is already done by `launch.sh test`)."""

from __future__ import annotations

import os
import subprocess

from sdtune.export.kohya import read_lora
from sdtune.recipe import load_recipe

from conftest import ROOT


# The demo as shipped, shortened to 100 of its 600 steps (previews every 50 instead of
# 200) to keep the suite's time; the whole demo is what the README's timing measures.
OVERRIDES = ["train.max_steps=100", "preview.every_steps=50", "train.logger=tensorboard"]


def test_launch_sh_runs_the_demo(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    overrides = [f"output.dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}", *OVERRIDES]
    run = subprocess.run(
        ["bash", "launch.sh", *[part for item in overrides for part in ("--set", item)]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out" / "tiny-demo.safetensors"
    assert f"wrote {out}" in run.stdout  # it ends by saying where the outputs are
    assert "training: 100%" in run.stderr and "loss=" in run.stderr and "step/s" in run.stderr  # progress bar
    # A quiet run: sdtune's own lines and progress bars only, no library notices.
    bars = ("training:", "caching latents:", "caching text:")
    noise = [line for line in run.stderr.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("sdtune:") and not line.lstrip().startswith(bars)]
    assert not noise, noise[:5]
    tensors, metadata = read_lora(out)
    assert metadata["modelspec.prediction_type"] == "v" and metadata["ss_steps"] == "100"
    # On the shipped trained base, from the trigger word's generated set.
    assert metadata["ss_sd_model_name"] == "tiny-base" and (ROOT / "datasets" / "world-zwx" / "world.json").is_file()
    assert any(k.endswith(".alpha") for k in tensors)
    assert load_recipe(tmp_path / "out" / "tiny-demo.recipe.yaml") == load_recipe(ROOT / "recipes/tiny_demo.yaml", overrides)
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    assert f"wrote {tmp_path / 'out' / 'tiny-demo.report.html'}" in run.stdout
    assert sorted(p.name for p in (tmp_path / "out" / "previews" / "tiny-demo").iterdir()) == [
        "step-000050.png", "step-000100.png"
    ]
    assert "validation loss" in run.stdout
