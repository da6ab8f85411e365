"""DeepSpeed ZeRO-2 (recipes/accelerate/deepspeed_zero2.yaml) on two CPU processes.

DeepSpeed runs on CPUs (``DS_ACCELERATOR=cpu``: gloo, and its CPU Adam for the
optimizer offload the shipped config asks for); ``tests/deepspeed_on_cpu.py`` gives
accelerate's state the process group DeepSpeed joined and runs sdtune's trainer
unchanged. Two processes with batch B train the same model as one process with batch B
and 2 accumulation steps, so the DeepSpeed run must end where the plain one does: its
engine averages, clips and applies the gradients inside ``accelerator.backward``, on
each process's partition of the optimizer state.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess

from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ACCELERATE, ROOT, free_port
from safetensors.torch import load_file
from test_distributed import TOLERANCE, _lora, _recipe
from test_fsdp import PREVIEWS, RunsCode, assert_lora_like_one_process, assert_near_by_norm, assert_previews_match, resumable_copy

from sdtune.errors import UserError
from sdtune.optim import make_optimizer
from sdtune.train import main
from sdtune.zero import check_config, check_trainable, configure

pytest.importorskip("deepspeed")  # in the test lock; a venv of the run lock alone has no DeepSpeed

# As in tests/test_fsdp.py: a clip far below the gradients' norm with AdamW's epsilon above
# their size makes each step depend on the clipped gradient's scale, so a clip by each
# process's own norm, or none, would end elsewhere.
LORA = ("lora.rank=64", "lora.alpha=1024", "train.max_grad_norm=0.01", "train.adam_epsilon=1.0", "train.learning_rate=0.5",
        "ema.decay=0.99")


# ZeRO-3 in a DeepSpeed config file: weights under 1e5 elements (all of the tiny model's)
# would otherwise stay whole on every process ("persistent"), and nothing would be partitioned.
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
# ZeRO-3 as it is run to fit a model: the weights' partitions and the optimizer in CPU RAM.
ZERO3_OFFLOAD = {"zero_optimization": ZERO3["zero_optimization"] | {"offload_param": {"device": "cpu"},
                                                                     "offload_optimizer": {"device": "cpu"}}}


@functools.cache
def _cpu_info() -> str:
    """py-cpuinfo's answer for this machine, asked once (tests/deepspeed_on_cpu.py)."""
    import cpuinfo

    return cpuinfo.get_cpu_info_json()


def _deepspeed(args: list[str], tmp_path, fails: bool = False, ds_config: dict | None = None, **settings) -> subprocess.CompletedProcess:
    """``sdtune/train.py ARGS`` on two CPU processes under recipes/accelerate/deepspeed_zero2.yaml,
    its deepspeed_config updated with ``settings``, or replaced by a DeepSpeed config file
    holding ``ds_config`` (``fails``: the run must stop with an error)."""
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "deepspeed_zero2.yaml").read_text(encoding="utf-8"))
    config |= {"num_processes": 2, "mixed_precision": "no", "gpu_ids": None}
    config["deepspeed_config"] |= settings
    if ds_config is not None:  # accelerate then takes nothing DeepSpeed's from its own config, precision included
        (tmp_path / "deepspeed.json").write_text(json.dumps(ds_config), encoding="utf-8")
        config["deepspeed_config"] = {"deepspeed_config_file": str(tmp_path / "deepspeed.json"), "zero3_init_flag": False}
        del config["mixed_precision"]
    path = tmp_path / "deepspeed_cpu.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    command = [str(ACCELERATE), "launch", "-q", "--config_file", str(path), "--main_process_port", str(free_port()),
               "--dynamo_backend", "no", str(ROOT / "tests" / "deepspeed_on_cpu.py"), *args]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                                                                   "SDTUNE_TEST_CPU_INFO": _cpu_info()}
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert (run.returncode != 0) == fails, run.stderr[-4000:]
    assert "; 2 process(es) on cpu, DEEPSPEED" in run.stdout
    return run


def test_deepspeed_lora_trains_like_one_process_checkpoints_small_and_resumes_exactly(tiny_v, small_dataset, tmp_path):
    cache, stem = tmp_path / "cache", "tiny-demo"
    result = main(_recipe(tiny_v, small_dataset, tmp_path / "one", cache, 2, 2, *LORA, *PREVIEWS, "checkpoint.every_steps=10"))
    validation = result.validation[-1][1]

    # As shipped: ZeRO-2 with the optimizer state and update on the CPU (DeepSpeed's CPU Adam).
    run = _deepspeed(_recipe(tiny_v, small_dataset, tmp_path / "two", cache, 2, 1, *LORA, *PREVIEWS, "checkpoint.every_steps=10"), tmp_path)
    two = assert_lora_like_one_process(tmp_path, stem, 10)  # measured 8.9e-8 (CPU Adam's own kernel)
    assert run.stdout.count(f"{stem}.safetensors\n") == 1
    # Every LoRA layer's gradient is seen in step 1, before DeepSpeed moves it into its partitions.
    assert "got no gradient" not in run.stderr
    assert f"validation loss {sum(validation.values()) / len(validation):.4f} at step 20" in run.stdout
    assert_previews_match(tmp_path, stem, (10, 20))  # base, LoRA and EMA rows, from the unwrapped model as without DeepSpeed

    # The checkpoint is DeepSpeed's: the LoRA's weights alone (not the frozen UNet) and each
    # process's optimizer partition, with every process's RNG; sdtune's EMA beside them.
    checkpoint = tmp_path / "two" / "checkpoints" / stem / "step-00000010"
    model = checkpoint / "pytorch_model"
    assert {p.name for p in model.iterdir()} == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    weights = torch.load(model / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert weights and all(".lora_" in name for name in weights), [n for n in weights if ".lora_" not in n][:3]
    assert {"ema.pt", "random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert not (checkpoint / "trainable.safetensors").exists()
    assert json.loads((checkpoint / "position.json").read_text())["deepspeed"] is True

    # Resumed from step 10, it ends where the uninterrupted run did, bit for bit: weights, the
    # CPU Adam's moments, the learning-rate schedule (which must follow the CPU Adam's groups
    # once the checkpoint has replaced them: 2e-3 away otherwise), EMA, RNG and data order.
    copied = resumable_copy(tmp_path, stem, 10)
    args = _recipe(tiny_v, small_dataset, tmp_path / "resumed", cache, 2, 1, *LORA, *PREVIEWS, "checkpoint.every_steps=10")
    run = _deepspeed([*args, "--resume", str(copied)], tmp_path)
    assert f"resumed from {copied} at step 10" in run.stdout
    resumed = _lora(tmp_path / "resumed" / f"{stem}.safetensors")
    assert all(torch.equal(resumed[k], two[k]) for k in two)

    # DeepSpeed's own loader would unpickle anything; sdtune's reads tensors, containers and
    # DeepSpeed's three record types only. An optimizer partition that would run code is refused.
    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, copied / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    run = _deepspeed([*args, "--resume", str(copied)], tmp_path, fails=True)
    assert "cannot be read (UnpicklingError" in run.stderr and not marker.exists()

    with pytest.raises(UserError, match="written under DeepSpeed, and this run does not use it"):
        main([*_recipe(tiny_v, small_dataset, tmp_path / "resumed", cache, 2, 2, *LORA, *PREVIEWS), "--resume", str(copied)])


def test_deepspeed_full_finetune_without_offload_accumulates_and_clips_like_one_process(tiny_v, small_dataset, tmp_path):
    """ZeRO-2 with the optimizer on each process (torch's AdamW on its flat partition) and 2
    accumulation steps a process: DeepSpeed scales the loss, averages over the processes and
    clips by the global norm inside its step."""
    cache, full = tmp_path / "cache", ("train.method=full", "train.optimizer=adamw", "train.max_steps=6", "ema.enabled=false",
                                       "train.max_grad_norm=0.01", "train.adam_epsilon=1.0", "train.learning_rate=0.05")
    one = load_file(main(_recipe(tiny_v, small_dataset, tmp_path / "one", cache, 1, 4, *full)).output)
    _deepspeed(_recipe(tiny_v, small_dataset, tmp_path / "two", cache, 1, 2, *full), tmp_path, offload_optimizer_device="none")
    two = load_file(tmp_path / "two" / "tiny-demo.safetensors")
    assert one.keys() == two.keys()
    unet = [k for k in one if k.startswith("model.diffusion_model.") and one[k].numel()]
    base = load_file(tiny_v / "unet" / "diffusion_pytorch_model.safetensors")
    assert sum(v.numel() for v in base.values()) == sum(one[k].numel() for k in unet)  # the whole UNet was written
    assert max((one[k] - two[k]).abs().max().item() for k in unet) < 1e-6


def test_deepspeed_in_bf16_runs_the_unet_under_sdtunes_autocast_and_trains_like_one_process(tiny_v, small_dataset, tmp_path):
    """DeepSpeed's own bf16 mode casts the whole model to bf16 and feeds it uncast inputs (the
    run stops: "mat1 and mat2 must have the same dtype"); sdtune runs DeepSpeed in fp32 with the
    UNet under autocast, frozen weights in bf16, as one process does (measured at 84c379d:
    0.053 % of the up weights' norm, 8.5e-8 of the down weights')."""
    cache, bf16 = tmp_path / "cache", (*LORA, "train.mixed_precision=bf16", "train.max_steps=10")
    one = _lora(main(_recipe(tiny_v, small_dataset, tmp_path / "one", cache, 2, 2, *bf16)).output)
    _deepspeed(_recipe(tiny_v, small_dataset, tmp_path / "two", cache, 2, 1, *bf16), tmp_path)
    assert_near_by_norm(one, _lora(tmp_path / "two" / "tiny-demo.safetensors"), {"lora_up": 0.01, "lora_down": 1e-4})


EVERY_5 = ("checkpoint.every_steps=5", "preview.every_steps=5", "validation.every_steps=5")


def test_deepspeed_zero3_lora_with_offload_gathers_its_results_and_previews_and_resumes_exactly(tiny_v, small_dataset, tmp_path):
    """ZeRO-3 partitions the weights themselves, frozen ones too: results, step exports and
    previews are gathered into a skeleton on the main process, as under FSDP; here with the
    partitions and the optimizer (DeepSpeed's CPU Adam) offloaded. The DeepSpeed run goes
    first, so that it encodes the captions itself (transformers would load the text encoder
    partitioned under ZeRO-3, and encoding would fail)."""
    cache, stem, lora = tmp_path / "cache", "tiny-demo", (*LORA, "ema.enabled=false", "train.max_steps=10")
    args = _recipe(tiny_v, small_dataset, tmp_path / "two", cache, 2, 1, *lora, *PREVIEWS, *EVERY_5)
    run = _deepspeed(args, tmp_path, ds_config=ZERO3_OFFLOAD)
    assert re.search(r"text cache [1-9][0-9]* encoded", run.stdout), run.stdout  # the DeepSpeed run encoded the captions
    result = main(_recipe(tiny_v, small_dataset, tmp_path / "one", cache, 2, 2, *lora, *PREVIEWS, *EVERY_5))
    two = assert_lora_like_one_process(tmp_path, stem, 5, moved=50 * TOLERANCE)  # 10 steps without EMA: 9e-4
    assert "got no gradient" not in run.stderr
    validation = result.validation[-1][1]
    assert f"validation loss {sum(validation.values()) / len(validation):.4f} at step 10" in run.stdout
    assert_previews_match(tmp_path, stem, (5, 10))

    # Each process writes its partition of the LoRA's weights (not the frozen UNet's) and of the optimizer state.
    checkpoint = tmp_path / "two" / "checkpoints" / stem / "step-00000005"
    assert {p.name for p in (checkpoint / "pytorch_model").iterdir()} == {
        f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1) for kind in ("model", "optim")}
    # Resumed from step 5, bit for bit: at step 6 the CPU Adam's beta2^t, restarted as pow(0.999, 6),
    # is a bit off the running product, unless sdtune replays steps 1-5 (1.2e-10 away without).
    copied = resumable_copy(tmp_path, stem, 5)
    args = _recipe(tiny_v, small_dataset, tmp_path / "resumed", cache, 2, 1, *lora, *PREVIEWS, *EVERY_5)
    run = _deepspeed([*args, "--resume", str(copied)], tmp_path, ds_config=ZERO3_OFFLOAD)
    resumed = _lora(tmp_path / "resumed" / f"{stem}.safetensors")
    assert all(torch.equal(resumed[k], two[k]) for k in two)


def test_deepspeed_zero3_full_finetune_writes_the_gathered_unet(tiny_v, small_dataset, tmp_path):
    cache, full = tmp_path / "cache", ("train.method=full", "train.optimizer=adamw", "train.max_steps=6", "ema.enabled=false",
                                       "train.max_grad_norm=0.01", "train.adam_epsilon=1.0", "train.learning_rate=0.05")
    _deepspeed(_recipe(tiny_v, small_dataset, tmp_path / "two", cache, 2, 1, *full), tmp_path, ds_config=ZERO3)
    one = load_file(main(_recipe(tiny_v, small_dataset, tmp_path / "one", cache, 2, 2, *full)).output)
    two = load_file(tmp_path / "two" / "tiny-demo.safetensors")
    assert one.keys() == two.keys()
    unet = [k for k in one if k.startswith("model.diffusion_model.") and one[k].numel()]
    base = load_file(tiny_v / "unet" / "diffusion_pytorch_model.safetensors")
    assert sum(v.numel() for v in base.values()) == sum(one[k].numel() for k in unet)  # the whole UNet, gathered
    assert max((one[k] - two[k]).abs().max().item() for k in one if one[k].numel()) < 1e-6  # the text encoder and VAE too


def _plugin(**config):
    return SimpleNamespace(zero_stage=config.get("zero_optimization", {}).get("stage", 2), deepspeed_config=config)


def test_deepspeed_configs_sdtune_is_not_built_on_are_refused_at_start():
    check_config(_plugin(zero_optimization={"stage": 2}))
    check_config(_plugin(zero_optimization={"stage": 1}))
    with pytest.raises(UserError, match="zero_stage is 0.*stage 1, 2 or 3"):
        check_config(_plugin(zero_optimization={"stage": 0}))
    for section in ("optimizer", "scheduler"):
        with pytest.raises(UserError, match=f"has an {section} section.*Remove the {section} section"):
            check_config(_plugin(**{section: {"type": "AdamW"}}))


def test_deepspeed_takes_batch_accumulation_and_clipping_from_the_recipe_and_refuses_other_values():
    def accelerator(accumulation=2, **config):
        state = SimpleNamespace(deepspeed_plugin=_plugin(**config))
        return SimpleNamespace(state=state, gradient_accumulation_steps=accumulation, num_processes=3)

    ready = accelerator(gradient_clipping="auto", bf16={"enabled": True})
    configure(ready, 4, 2, 0.5)
    config = ready.state.deepspeed_plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["gradient_clipping"]) == (4, 2, 0.5)
    assert config["train_batch_size"] == 4 * 2 * 3 and config["bf16"] == {"enabled": False}
    configure(accelerator(gradient_clipping=0.5, train_micro_batch_size_per_gpu=4), 4, 2, 0.5)  # the same values: fine
    for key, value, recipe_key in (("gradient_clipping", 1.0, "train.max_grad_norm: 0.5"),
                                   ("train_micro_batch_size_per_gpu", 8, "train.batch_size: 4"),
                                   ("gradient_accumulation_steps", 1, "train.gradient_accumulation_steps: 2")):
        with pytest.raises(UserError, match=f"sets {key}: {value} and the recipe {recipe_key}.*Remove {key}"):
            configure(accelerator(**{key: value}), 4, 2, 0.5)
    with pytest.raises(UserError, match="accelerate accumulates over 4 batches.*train.gradient_accumulation_steps is 2"):
        configure(accelerator(accumulation=4), 4, 2, 0.5)


def test_what_deepspeed_cannot_train_is_refused_before_training():
    unet, text_encoder = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    offload = _plugin(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})

    def optimizer(kind):
        return make_optimizer([{"params": list(unet.parameters()), "lr": 1e-3}], kind, (0.9, 0.999), 0.01, 1e-8)

    check_trainable({"unet": unet}, optimizer("adamw"), offload, "bf16")
    check_trainable({"unet": unet}, optimizer("lion"), _plugin(), "no")  # elementwise, on the process's partition
    with pytest.raises(UserError, match="train.optimizer: lion cannot train under DeepSpeed: .*CPU Adam, so it would train with Adam"):
        check_trainable({"unet": unet}, optimizer("lion"), offload, "no")
    for kind, why in (("adamw8bit", "8-bit state"), ("adafactor", "unfactored"), ("prodigy", "step size")):
        with pytest.raises(UserError, match=f"train.optimizer: {kind} cannot train under DeepSpeed: .*{why}.*adamw"):
            check_trainable({"unet": unet}, optimizer(kind), _plugin(), "no")
    with pytest.raises(UserError, match="trains none of them.*textual inversion"):
        check_trainable({"unet": torch.nn.Linear(4, 4).requires_grad_(False), "text_encoder": text_encoder}, optimizer("adamw"), _plugin(), "no")
    with pytest.raises(UserError, match="trains the UNet only.*lora.text_encoder: false"):
        check_trainable({"unet": unet, "text_encoder": text_encoder}, optimizer("adamw"), _plugin(), "no")
    zero3 = _plugin(zero_optimization={"stage": 3})
    check_trainable({"unet": unet}, optimizer("adamw"), zero3, "bf16", ema=False)
    check_trainable({"unet": unet}, optimizer("adamw"), _plugin(), "bf16", ema=True)
    with pytest.raises(UserError, match="ema.enabled under DeepSpeed ZeRO-3.*ema.enabled: false.*zero_stage: 2"):
        check_trainable({"unet": unet}, optimizer("adamw"), zero3, "bf16", ema=True)
    with pytest.raises(UserError, match="fp16 under DeepSpeed.*bf16"):
        check_trainable({"unet": unet}, optimizer("adamw"), _plugin(), "fp16")
