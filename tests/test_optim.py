"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from sdtune.errors import MissingExtraError
from sdtune.optim import make_lr_scheduler, make_optimizer


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit", "adafactor", "lion", "prodigy"])
def test_every_optimizer_reduces_a_quadratic(kind):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    target = torch.randn(64, 64)
    lr = 1.0 if kind == "prodigy" else 1e-2
    optimizer = make_optimizer([{"params": [weight], "lr": lr}], kind, (0.9, 0.999), 0.0, 1e-8)
    first = None
    for _ in range(30):
        loss = (weight - target).pow(2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.8 * first, (kind, first, loss.item())


def test_adamw_is_fused_on_cpu_and_matches_the_per_tensor_loop():
    """The fused kernel (one call for all tensors) is what runs on CPU too; it must make
    the update the reference loop makes, to float rounding, decay and eps included."""
    torch.manual_seed(0)
    shapes = [(320, 4), (4, 320), (8, 8, 3, 3), (32,)]
    start = [torch.randn(shape) for shape in shapes]
    fused_params, loop_params = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    fused = make_optimizer([{"params": fused_params, "lr": 1e-2}], "adamw", (0.9, 0.99), 1e-2, 1e-6)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6, foreach=False)
    assert fused.defaults["fused"] is True
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        for a, b in zip(fused_params, loop_params):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b, s in zip(fused_params, loop_params, start):
        assert (a - s).abs().max() > 1e-3  # it moved
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _lrs(name, warmup=10, total=100, cycles=1, power=1.0):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = make_lr_scheduler(optimizer, name, warmup, total, cycles, power)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_schedules():
    assert _lrs("constant", warmup=0) == [1.0] * 100
    warm = _lrs("constant_with_warmup")
    assert warm[0] == 0.0 and warm[5] == pytest.approx(0.5) and warm[10:] == [1.0] * 90
    cosine = _lrs("cosine")
    assert cosine[10] == pytest.approx(1.0) and cosine[55] == pytest.approx(0.5) and cosine[-1] < 0.01
    restarts = _lrs("cosine_with_restarts", cycles=3)
    assert restarts[40] > 0.9 and restarts[41] < restarts[40] and max(restarts[45:]) > 0.9  # it restarts
    linear = _lrs("linear")
    assert linear[55] == pytest.approx(0.5)
    quadratic = _lrs("polynomial", power=2.0)
    assert quadratic[55] < linear[55]
    one_cycle = _lrs("one_cycle", warmup=20)
    peak = max(range(100), key=one_cycle.__getitem__)
    assert abs(peak - 20) <= 1 and one_cycle[0] < 0.1 and one_cycle[-1] < 1e-3
    assert math.isclose(max(one_cycle), 1.0, rel_tol=1e-3)


def test_missing_optional_optimizer_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # makes the import fail
    with pytest.raises(MissingExtraError, match=r"sdtune\[lion\]"):
        make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-4}], "lion", (0.9, 0.99), 0.0, 1e-8)
