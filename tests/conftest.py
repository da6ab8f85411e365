"""Shared fixtures: the tiny models are built once per test session."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from sdtune.tiny import make_tiny

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "datasets" / "sample"
ACCELERATE = Path(sys.executable).parent / "accelerate"
# DeepSpeed's compiled CPU ops: where `bash launch.sh test` builds them, once per lock, so that a
# direct pytest run finds them too (DeepSpeed would otherwise build them in its first test).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix).resolve() / "torch-extensions"))


def free_port() -> int:
    """A TCP port nobody listens on, for a launch's rendezvous (tests may launch side by side)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_processes(count: int, *script: str) -> tuple[list[str], dict[str, str]]:
    """Command and environment that run ``script`` as ``count`` CPU processes (gloo). Only
    ACCELERATE_USE_CPU=1 with --multi_gpu gives accelerate's MULTI_CPU: `--cpu --num_processes
    2` runs one process, and --multi_gpu alone runs independent ones."""
    command = [str(ACCELERATE), "launch", "-q", "--multi_gpu", "--num_processes", str(count), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *script]
    return command, os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


# The longest tests (10-140 s each on 2 cores), longest first: run first (pytest_configure), so
# that the workers share out the short ones as they finish, instead of one worker ending the
# session alone on a long test.
LONGEST = ("test_deepspeed.py::test_deepspeed_", "test_fsdp.py::test_fsdp_", "test_distributed.py::test_two_processes",
           "test_reliability.py::test_a_killed", "test_demo.py::", "test_train.py::test_sigterm",
           "test_sdxl_train.py::test_sdxl_lora_run", "test_textual_inversion.py::test_two_processes",
           "test_data_pipeline.py::test_sdtune_cache_under_accelerate", "test_recipes.py::test_shipped_recipe_runs",
           "test_tiny_base_draws.py::", "test_export_cli.py::test_sdxl_files", "test_benchmarks.py::test_training_benchmark")


def pytest_configure(config):
    # pytest-xdist hands each worker a first chunk of a quarter of its share of consecutive tests
    # (53 here), which would give one worker every long test; one at a time, the longest go
    # first to whichever worker is free.
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        return next((i for i, name in enumerate(LONGEST) if name in item.nodeid), len(LONGEST))

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_v(tmp_path_factory) -> Path:
    """Tiny SD model whose scheduler says v-prediction."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-v", "v_prediction")


@pytest.fixture(scope="session")
def tiny_eps(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-eps", "epsilon")


@pytest.fixture(scope="session")
def tiny_sd2_v(tmp_path_factory) -> Path:
    """Tiny model of the SD 2.x kind (OpenCLIP-style text encoder, linear projections), v-prediction."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sd2-v", "v_prediction", arch="sd_v2")


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    """The first 8 sample images with their captions, in a folder the test may change."""
    folder = tmp_path / "data"
    folder.mkdir()
    for image in sorted(p for p in SAMPLE.iterdir() if p.suffix != ".txt")[:8]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process; tests train many times in one
    process with different precisions, so start each test without it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture(scope="session", params=["sd_v1", "sd_v2"])
def reduced(request):
    """(version, unet, vae, text_encoder) with the real SD 1.5 / SD 2.1 topology at reduced width."""
    from sdtune.tiny import reduced_sd

    return (request.param, *reduced_sd(request.param))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """Tiny SDXL model (`sdtune make-tiny --arch sdxl`): SDXL 1.0's block layout and depths at reduced
    width, CLIP-L and bigG with projection, both tokenizers; epsilon prediction."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sdxl", "epsilon", arch="sdxl_base_v1-0")
