"""FSDP (recipes/accelerate/fsdp.yaml: FSDP1, FULL_SHARD) on two CPU processes.

accelerate builds its FSDP state only for GPU-like devices; ``tests/fsdp_on_cpu.py``
lets it do so for CPU processes (gloo) and runs sdtune's trainer unchanged, so torch's
FullyShardedDataParallel shards the UNet as it would on GPUs. Two processes with batch
B train the same model as one process with batch B and 2 accumulation steps (the batch
order is sharded, not changed: tests/test_distributed.py), so the sharded run must end
where the unsharded one does, with its results, step exports and previews written
from the gathered weights.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from accelerate.utils import DistributedType
from conftest import ACCELERATE, ROOT, free_port
from PIL import Image
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from test_distributed import TOLERANCE, _lora, _max_difference, _recipe

from sdtune.errors import UserError
from sdtune.optim import make_optimizer
from sdtune.sharded import ModelView
from sdtune.train import main

# Clipping by a norm far below the gradients' with AdamW's epsilon above their size makes
# each step depend on the clipped gradient's scale, so a process that clipped its slice
# by its own slice's norm (what accelerate's clip_grad_norm_ does for a LoRA under FSDP)
# would end elsewhere. At rank 64 the tiny model's LoRA weights lie in both processes'
# slices (at rank 8, all in rank 0's). The high learning rate and the slow EMA make the
# base, LoRA and EMA rows of the previews visibly different.
LORA = ("lora.rank=64", "lora.alpha=1024", "train.max_grad_norm=0.01", "train.adam_epsilon=1.0", "train.learning_rate=0.5",
        "ema.decay=0.99")
PREVIEWS = ("preview.prompts=[a zwx circle in the center]", "preview.every_steps=10", "preview.steps=4",
            "data.validation_split=4", "validation.every_steps=10")  # 4 left: whole global batches of 4


def _fsdp(args: list[str], tmp_path, fails: bool = False) -> subprocess.CompletedProcess:
    """``sdtune/train.py ARGS`` on two CPU processes under recipes/accelerate/fsdp.yaml
    (``fails``: the run must stop with an error)."""
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text(encoding="utf-8"))
    config |= {"use_cpu": True, "num_processes": 2, "mixed_precision": "no"}
    path = tmp_path / "fsdp_cpu.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    command = [str(ACCELERATE), "launch", "-q", "--config_file", str(path), "--main_process_port", str(free_port()),
               "--dynamo_backend", "no", str(ROOT / "tests" / "fsdp_on_cpu.py"), *args]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert (run.returncode != 0) == fails, run.stderr[-4000:]
    assert "; 2 process(es) on cpu, FSDP" in run.stdout
    return run


class RunsCode:
    """Unpickled, it creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def assert_lora_like_one_process(tmp_path, stem: str, export_step: int, moved: float = 100 * TOLERANCE) -> dict[str, torch.Tensor]:
    """The LoRA of the run in ``tmp_path / "two"`` and its step export at ``export_step`` are
    within TOLERANCE of the one-process run's in ``tmp_path / "one"``, and training moved its up
    weights past ``moved`` (they start at zero); returns it."""
    one, two = (_lora(tmp_path / run / f"{stem}.safetensors") for run in ("one", "two"))
    assert _max_difference(two, one) < TOLERANCE, _max_difference(two, one)
    assert max(t.abs().max().item() for k, t in two.items() if "lora_up" in k) > moved
    export = f"{stem}-step{export_step:06d}.safetensors"
    assert _max_difference(_lora(tmp_path / "two" / export), _lora(tmp_path / "one" / export)) < TOLERANCE
    return two


def assert_near_by_norm(one: dict, two: dict, tolerances: dict[str, float]) -> None:
    """For each part of the LoRA's names (``lora_up``...), ``two``'s weights differ from ``one``'s
    by less than the tolerance times their norm."""
    for part, tolerance in tolerances.items():
        keys = [k for k in one if part in k]
        difference = torch.cat([(two[k] - one[k]).flatten() for k in keys]).norm()
        assert difference / torch.cat([one[k].flatten() for k in keys]).norm() < tolerance, part


def resumable_copy(tmp_path, stem: str, step: int):
    """A copy of the run folder ``two`` without its result, as ``resumed``; returns the copy's
    checkpoint at ``step``."""
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    (tmp_path / "resumed" / f"{stem}.safetensors").unlink()
    return tmp_path / "resumed" / "checkpoints" / stem / f"step-{step:08d}"


def assert_previews_match(root, stem: str, steps: tuple[int, ...], runs=("two", "one"), levels: int = 2) -> None:
    """The previews the runs under ``root`` drew at ``steps`` differ by at most ``levels``."""
    for step in steps:
        drawn = [_pixels(root / run / "previews" / stem / f"step-{step:06d}.png") for run in runs]
        assert drawn[0].shape == drawn[1].shape and np.abs(drawn[0] - drawn[1]).max() <= levels, step


def test_fsdp_lora_trains_like_one_process_writes_once_and_resumes_exactly(tiny_v, small_dataset, tmp_path):
    cache, stem = tmp_path / "cache", "tiny-demo"
    result = main(_recipe(tiny_v, small_dataset, tmp_path / "one", cache, 2, 2, *LORA, *PREVIEWS, "checkpoint.every_steps=10"))
    validation = result.validation[-1][1]

    run = _fsdp(_recipe(tiny_v, small_dataset, tmp_path / "two", cache, 2, 1, *LORA, *PREVIEWS, "checkpoint.every_steps=10"), tmp_path)
    # The result and the step export, from the gathered weights: kohya names (no FSDP
    # wrapper in them), whole shapes, the unsharded run's values; written once.
    two = assert_lora_like_one_process(tmp_path, stem, 10)
    assert run.stdout.count(f"{stem}.safetensors\n") == 1
    # Every LoRA layer got a gradient in step 1 on some process: the step-1 check asks them all.
    assert "got no gradient" not in run.stderr
    # The validation loss, which every process computes through the sharded UNet, as unsharded.
    assert f"validation loss {sum(validation.values()) / len(validation):.4f} at step 20" in run.stdout
    # Previews, raw and EMA rows, drawn from the gathered weights as the unsharded run drew them.
    assert_previews_match(tmp_path, stem, (10, 20))

    # The checkpoint: each process's slice of the LoRA's weights and optimizer state (torch's
    # distributed checkpoint; not the frozen UNet's, which accelerate's FSDP save would write),
    # its RNG and its EMA slice; no gathered copy.
    checkpoint = tmp_path / "two" / "checkpoints" / stem / "step-00000010"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"fsdp_trained", "scheduler.bin", "ema_0.pt", "ema_1.pt", "random_states_0.pkl", "random_states_1.pkl"} <= names
    assert not names & {"trainable.safetensors", "ema.pt", "pytorch_model_fsdp_0", "optimizer_0"}
    saved = dcp.FileSystemReader(str(checkpoint / "fsdp_trained")).read_metadata().state_dict_metadata  # our own file
    weights = [k for k in saved if k.startswith("model.")]
    assert all(".lora_A." in k or ".lora_B." in k for k in weights)
    lora = [t for k, t in two.items() if ".lora_up." in k or ".lora_down." in k]
    assert len(weights) == len(lora)
    lora_size = sum(t.numel() for t in lora)
    sizes = [(k, math.prod(v.size)) for k, v in saved.items() if hasattr(v, "size") and not k.endswith(".step")]
    assert sum(n for _, n in sizes) == 3 * lora_size, sizes[:3]  # weights, AdamW's two moments
    unet_size = sum(t.numel() for t in load_file(tiny_v / "unet" / "diffusion_pytorch_model.safetensors").values())
    written = sum(f.stat().st_size for f in (checkpoint / "fsdp_trained").iterdir())
    assert written < 4 * (3 * lora_size + unet_size / 2), (written, lora_size, unet_size)  # fp32, with each file's framing
    assert json.loads((checkpoint / "position.json").read_text())["sharded"] is True

    # Resumed from step 10 (a copy of the run folder without its results), it ends where the
    # uninterrupted run did, bit for bit: weights, AdamW's moments, EMA, RNG and data order.
    copied = resumable_copy(tmp_path, stem, 10)
    args = _recipe(tiny_v, small_dataset, tmp_path / "resumed", cache, 2, 1, *LORA, *PREVIEWS, "checkpoint.every_steps=10")
    run = _fsdp([*args, "--resume", str(copied)], tmp_path)
    assert f"resumed from {copied} at step 10" in run.stdout
    assert "got no gradient" not in run.stderr
    resumed = _lora(tmp_path / "resumed" / f"{stem}.safetensors")
    assert all(torch.equal(resumed[k], two[k]) for k in two)

    # torch 2.13 reads what its distributed checkpoints hold besides tensors (the optimizer's
    # settings) with torch.load(weights_only=False); sdtune's planner reads them as plain values,
    # so an optimizer setting that would run code is refused without running it.
    marker = tmp_path / "ran"
    folder = copied / "fsdp_trained"
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()  # our own file
    index = next(i for i in metadata.storage_data if i.fqn.startswith("optimizer.param_groups")
                 and isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    planted, where = io.BytesIO(), metadata.storage_data[index]
    torch.save(RunsCode(marker), planted)
    offset = (folder / where.relative_path).stat().st_size
    with open(folder / where.relative_path, "ab") as handle:
        handle.write(planted.getvalue())
    metadata.storage_data[index] = dataclasses.replace(where, offset=offset, length=len(planted.getvalue()))
    original = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    run = _fsdp([*args, "--resume", str(copied)], tmp_path, fails=True)
    assert "cannot be read (UnpicklingError: Weights only load failed" in run.stderr and not marker.exists(), run.stderr[-2000:]
    (folder / ".metadata").write_bytes(original)

    # torch reads the metadata of its distributed checkpoints with pickle.load; sdtune checks it
    # first, so a metadata file that would run code is refused without running it.
    (copied / "fsdp_trained" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    run = _fsdp([*args, "--resume", str(copied)], tmp_path, fails=True)
    assert "cannot be read (UnpicklingError: pathlib.Path.touch is not part of" in run.stderr and not marker.exists()

    # Without FSDP the checkpoint cannot be resumed: it holds slices of the weights.
    with pytest.raises(UserError, match="written under FSDP, and this run does not use it"):
        main([*_recipe(tiny_v, small_dataset, tmp_path / "resumed", cache, 2, 2, *LORA, *PREVIEWS), "--resume", str(copied)])


@pytest.mark.parametrize("arch", ["sd_v1", "sdxl"])
def test_fsdp_full_finetune_writes_the_gathered_unet_and_clips_by_the_global_norm(arch, request, small_dataset, tmp_path):
    """Every weight trains and lies in one process's slice or the other's; a clip by each
    process's own norm ends 3e-5 away from the unsharded run, the global norm 1e-8. SDXL's
    UNet is wrapped by the same block classes, with gradient checkpointing inside them."""
    model = request.getfixturevalue("tiny_v" if arch == "sd_v1" else "tiny_sdxl")
    cache, full = tmp_path / "cache", ("train.method=full", "train.optimizer=adamw", "train.max_steps=6", "ema.enabled=false",
                                       "train.max_grad_norm=0.01", "train.adam_epsilon=1.0", "train.learning_rate=0.05")
    if arch == "sdxl":
        full += ("model.prediction_type=epsilon", "model.zero_terminal_snr=false", "train.gradient_checkpointing=true")
    one = load_file(main(_recipe(model, small_dataset, tmp_path / "one", cache, 2, 2, *full)).output)
    _fsdp(_recipe(model, small_dataset, tmp_path / "two", cache, 2, 1, *full), tmp_path)
    two = load_file(tmp_path / "two" / "tiny-demo.safetensors")
    assert one.keys() == two.keys()
    unet = [k for k in one if k.startswith("model.diffusion_model.") and one[k].numel()]
    assert max((one[k] - two[k]).abs().max().item() for k in unet) < 1e-6
    base = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")  # the whole UNet was written, not a slice
    assert sum(v.numel() for v in base.values()) == sum(one[k].numel() for k in unet)


def test_fsdp_in_bf16_keeps_the_frozen_weights_fp32_and_trains_like_one_process(tiny_v, small_dataset, tmp_path):
    """FSDP flattens a unit's frozen and trained weights into one tensor of one dtype, so under
    FSDP the frozen weights stay fp32 (stored in bf16, as without FSDP, the run stops: "Must
    flatten tensors with uniform dtype") and FSDP's mixed precision casts them to bf16, reducing
    the gradients in bf16 too: the LoRA ends near one process's in bf16, not on it (measured
    after 10 steps: 1.4 % of the up weights' norm, 0.17 % of the down weights')."""
    cache, bf16 = tmp_path / "cache", ("train.mixed_precision=bf16", "train.max_steps=10")
    one = _lora(main(_recipe(tiny_v, small_dataset, tmp_path / "one", cache, 2, 2, *bf16)).output)
    _fsdp(_recipe(tiny_v, small_dataset, tmp_path / "two", cache, 2, 1, *bf16), tmp_path)
    assert_near_by_norm(one, _lora(tmp_path / "two" / "tiny-demo.safetensors"), {"lora_up": 0.05, "lora_down": 0.01})


def _view(optimizer: str = "adamw", **models):
    groups = [{"params": [p for m in models.values() for p in m.parameters() if p.requires_grad], "lr": 1e-3}]
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=1, mixed_precision="no",
                                  device=torch.device("cpu"))
    return ModelView(models, make_optimizer(groups, optimizer, (0.9, 0.999), 0.01, 1e-8), accelerator)


def test_what_fsdp_cannot_shard_is_refused_before_training():
    unet, text_encoder = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with pytest.raises(UserError, match="trains weights of the UNet, and this run trains none of them.*textual inversion"):
        _view(unet=torch.nn.Linear(4, 4).requires_grad_(False), text_encoder=text_encoder)
    with pytest.raises(UserError, match="trains the UNet only.*lora.text_encoder: false"):
        _view(unet=unet, text_encoder=text_encoder)
    for kind, why in (("adamw8bit", "8-bit state"), ("adafactor", "unfactored"), ("prodigy", "step size")):
        with pytest.raises(UserError, match=f"train.optimizer: {kind} cannot train under FSDP: .*{why}.*adamw"):
            _view(kind, unet=unet)
    for kind in ("adamw", "lion"):  # elementwise, with state of the parameters' shapes
        view = _view(kind, unet=unet)
        assert view.sharded and view.skeletons["unet"].weight.device.type == "meta"  # a skeleton holds no memory
        assert view.skeletons["unet"].weight.requires_grad


def test_fsdp_settings_the_sharded_path_is_not_built_on_are_refused():
    from sdtune.compute import _check_engine

    def accelerator(**changes):
        plugin = SimpleNamespace(fsdp_version=1, sharding_strategy=SimpleNamespace(name="FULL_SHARD"),
                                 state_dict_type=SimpleNamespace(name="SHARDED_STATE_DICT"), use_orig_params=True)
        return SimpleNamespace(distributed_type=DistributedType.FSDP, is_local_main_process=True,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(**vars(plugin) | changes)))

    _check_engine(accelerator())  # recipes/accelerate/fsdp.yaml's
    _check_engine(accelerator(sharding_strategy=SimpleNamespace(name="SHARD_GRAD_OP")))
    for changes, said in ((dict(sharding_strategy=SimpleNamespace(name="HYBRID_SHARD")), "fsdp_sharding_strategy is HYBRID_SHARD"),
                          (dict(state_dict_type=SimpleNamespace(name="FULL_STATE_DICT")), "fsdp_state_dict_type is FULL_STATE_DICT"),
                          (dict(use_orig_params=False), "fsdp_use_orig_params is False.*Set fsdp_use_orig_params: true")):
        with pytest.raises(UserError, match=said):
            _check_engine(accelerator(**changes))
