"""Training on several processes: the accelerate configs in recipes/accelerate/ mean what
their comments say, `launch.sh train --processes N` builds the launch command it should
(and really runs 2 connected CPU processes), and benchmarks/distributed_memory.py adds up."""

from __future__ import annotations

import importlib.util
import itertools
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from conftest import ROOT, free_port

CONFIGS = ROOT / "recipes" / "accelerate"
# What each shipped config is for: (distributed_type, num_processes, num_machines).
EXPECTED = {
    "one_gpu.yaml": (DistributedType.NO, 1, 1),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "fsdp.yaml": (DistributedType.FSDP, 8, 1),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, 1),
    "two_nodes.yaml": (DistributedType.MULTI_GPU, 16, 2),
}
UNET_BLOCKS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]


def _benchmark():
    spec = importlib.util.spec_from_file_location("distributed_memory", ROOT / "benchmarks" / "distributed_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch_args(config: Path, *flags: str):
    """What `accelerate launch --config_file CONFIG [FLAGS] train.py` resolves, as its launcher does."""
    args = launch_command_parser().parse_args(["--config_file", str(config), *flags, "sdtune/train.py"])
    return _validate_launch_command(args)


def test_every_config_is_expected_and_says_how_to_launch_it():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name in EXPECTED:
        lines = (CONFIGS / name).read_text(encoding="utf-8").splitlines()
        head = "\n".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
        assert "bash launch.sh train " in head and f"--config_file recipes/accelerate/{name}" in head, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerates_loader_reads_each_config(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes, config.num_machines) == EXPECTED[name]
    assert config.use_cpu is False
    # Every key reaches accelerate launch: a misspelled one, or one the launcher overrides
    # with its own default (same_network, rdzv_backend), would be ignored without a word.
    args, _, _ = _launch_args(CONFIGS / name)
    raw = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    nested = raw.get("fsdp_config", {}) | raw.get("deepspeed_config", {})
    settings = {k: v for k, v in raw.items() if not isinstance(v, dict)} | nested
    for key, value in settings.items():
        if key not in ("compute_environment", "distributed_type"):  # these two pick the launcher (EXPECTED)
            assert getattr(args, key) == value, f"{name}: accelerate launch does not take {key}: {value}"
    options = vars(launch_command_parser().parse_args(["x.py"]))
    unknown = [key for key in nested if key not in options]  # the loader checks only the top-level names
    assert not unknown, f"{name}: not accelerate launch options: {unknown}"


def test_fsdp_config_reaches_the_plugin_as_written():
    args, _, _ = _launch_args(CONFIGS / "fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    # Off, or transformers would load the (unsharded) text encoder's weights on rank 0 only;
    # sdtune broadcasts the trained weights itself (sync_module_states, which torch refuses on CPU).
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false" and env["FSDP_SYNC_MODULE_STATES"] == "false"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.use_orig_params is True
    assert plugin.transformer_cls_names_to_wrap == UNET_BLOCKS
    benchmark = _benchmark()
    for arch in ("sd_v1", "sd_v2"):  # accelerate wraps by class name; a missing one stops prepare()
        unet = benchmark.meta_unet(arch)
        with mock.patch.dict(os.environ, env, clear=True):
            plugin = FullyShardedDataParallelPlugin()
        plugin.set_auto_wrap_policy(unet)
        assert sorted(c.__name__ for c in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]) == sorted(UNET_BLOCKS)


def test_deepspeed_config_reaches_the_plugin_as_written():
    args, defaults, _ = _launch_args(CONFIGS / "deepspeed_zero2.yaml")
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "none"
    # "auto": sdtune fills them from the recipe (train.max_grad_norm, train.gradient_accumulation_steps).
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"


def test_two_nodes_run_the_same_command_with_their_own_rank():
    port = free_port()  # rank 0 refuses a port in use on this machine
    for rank in (0, 1):
        args, _, _ = _launch_args(CONFIGS / "two_nodes.yaml", "--machine_rank", str(rank), "--main_process_port", str(port))
        prepare_multi_gpu_env(args)
        assert (args.multi_gpu, args.nnodes, args.nproc_per_node, args.node_rank) == (True, "2", "8", rank)
        assert args.rdzv_endpoint == f"main-node.invalid:{port}"  # the placeholder the user replaces


def _dry_run(tmp_path: Path, *args: str, gpu: bool = False, force_cpu: bool = False) -> subprocess.CompletedProcess:
    """`bash launch.sh train ARGS` with SDTUNE_LAUNCH_DRY_RUN=1, on a PATH that has nvidia-smi or not."""
    bin_dir = tmp_path / ("bin-gpu" if gpu else "bin")
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "dirname").exists():
        (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PATH": str(bin_dir), "SDTUNE_LAUNCH_DRY_RUN": "1", "HOME": str(tmp_path),
           # A venv that does not exist: a dry run must not set one up.
           "SDTUNE_VENV": str(tmp_path / "no-venv"), **({"SDTUNE_FORCE_CPU": "1"} if force_cpu else {})}
    return subprocess.run([shutil.which("bash"), "launch.sh", "train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _launched(run: subprocess.CompletedProcess) -> tuple[list[str], list[str], list[str]]:
    """(environment, accelerate launch's flags, the script's arguments) of the printed command."""
    assert run.returncode == 0, run.stderr
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("sdtune: launching: ")]
    words = shlex.split(line.removeprefix("sdtune: launching: "))
    env = words[:1] if words[0].startswith("ACCELERATE_") else []
    words = words[len(env):]
    assert words[1:3] == ["launch", "-q"] and words[0].endswith("no-venv/bin/accelerate")
    script = words.index("sdtune/train.py")
    return env, words[3:script], words[script + 1:]


def test_launch_defaults_to_one_process(tmp_path):
    env, launcher, script = _launched(_dry_run(tmp_path, "recipes/tiny_demo.yaml"))
    assert env == []
    assert launcher == ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    assert script == ["--recipe", "recipes/tiny_demo.yaml"]


def test_several_processes_without_a_gpu_are_connected_cpu_processes(tmp_path):
    env, launcher, _ = _launched(_dry_run(tmp_path, "recipes/tiny_demo.yaml", "--processes", "2"))
    assert env == ["ACCELERATE_USE_CPU=1"]
    assert launcher[:3] == ["--multi_gpu", "--num_processes", "2"]
    env, launcher, _ = _launched(_dry_run(tmp_path, "recipes/tiny_demo.yaml", "--processes=2", gpu=True))
    assert env == [] and launcher[:3] == ["--multi_gpu", "--num_processes", "2"]  # one per GPU
    env, _, _ = _launched(_dry_run(tmp_path, "recipes/tiny_demo.yaml", "--processes", "2", gpu=True, force_cpu=True))
    assert env == ["ACCELERATE_USE_CPU=1"]


def test_accelerate_flags_go_before_the_script_and_sdtune_flags_after(tmp_path):
    run = _dry_run(tmp_path, "r.yaml", "--config_file", "recipes/accelerate/fsdp.yaml", "--set", "a=b", "--mixed_precision", "bf16",
                   "--resume", "latest", "--main_process_port=29555", "--same_network", "--debug", "--set", "preview.prompts=[x y]")
    env, launcher, script = _launched(run)
    # With a config file only what was asked for: no defaults that would override the file.
    assert launcher == ["--config_file", "recipes/accelerate/fsdp.yaml", "--mixed_precision", "bf16", "--main_process_port=29555", "--same_network"]
    assert script == ["--recipe", "r.yaml", "--set", "a=b", "--resume", "latest", "--debug", "--set", "preview.prompts=[x y]"]
    assert env == ["ACCELERATE_USE_CPU=1"]  # the config may ask for several processes; this machine has no GPU
    _, launcher, _ = _launched(_dry_run(tmp_path, "r.yaml", "--config_file", "c.yaml", "--processes", "4", gpu=True))
    assert launcher == ["--num_processes", "4", "--config_file", "c.yaml"]
    # Without one, a flag the user gives replaces launch.sh's default for it.
    _, launcher, _ = _launched(_dry_run(tmp_path, "r.yaml", "--mixed_precision", "bf16"))
    assert launcher.count("--mixed_precision") == 1 and launcher[launcher.index("--mixed_precision") + 1] == "bf16"


def test_launch_refuses_what_it_cannot_read(tmp_path):
    for args in (["r.yaml", "--processes", "two"], ["r.yaml", "--processes", "0"], ["--processes", "2"], ["r.yaml", "stray"]):
        run = _dry_run(tmp_path, *args)
        assert run.returncode == 2, (args, run.stderr)
        assert "sdtune: launching:" not in run.stderr


def test_memory_estimates_add_up():
    benchmark = _benchmark()
    params = benchmark.unet_parameters("sd_v1")
    assert params == 859_520_964  # SD 1.5's UNet, as published
    gpu = benchmark.gpu_bytes
    assert gpu(params, 1, "ddp", "adamw") == 16 * params  # 4 weights + 4 gradients + 8 AdamW moments
    assert gpu(params, 1, "ddp", "adamw8bit") == 10 * params
    for optimizer in ("adamw", "adamw8bit"):
        for n in (1, 2, 4, 8):
            ddp = gpu(params, n, "ddp", optimizer)
            assert ddp == gpu(params, 1, "ddp", optimizer)  # DDP replicates everything
            assert gpu(params, n, "fsdp", optimizer) == pytest.approx(ddp / n)
            assert gpu(params, n, "zero2", optimizer) == pytest.approx(4 * params + (ddp - 4 * params) / n)
            assert gpu(params, n, "zero2_offload", optimizer) < gpu(params, n, "zero2", optimizer)
        assert gpu(params, 8, "fsdp", optimizer) < gpu(params, 8, "zero2", optimizer) < ddp
    assert benchmark.cpu_bytes(params, 4, "zero2_offload", "adamw") == 2 * params  # 8 bytes / 4 processes
    result = benchmark.estimate("sd_v1")
    assert result["per_gpu"]["adamw"]["8"]["fsdp"] == round(16 * params / 8 / 2**30, 2)
    assert "zero2_offload" not in result["per_gpu"]["adamw8bit"]["1"]  # offload swaps in DeepSpeed's fp32 CPU Adam
    assert "| 8 | 12.81 | 1.60 | 4.40 | 3.60 | 0.80 |" in benchmark.table(result)
