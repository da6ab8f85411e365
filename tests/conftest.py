"""Shared fixtures: the tiny models are built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sdtune.tiny import make_tiny

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "datasets" / "sample"


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
