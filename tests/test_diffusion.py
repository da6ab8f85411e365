"""The diffusion maths against shared/REFERENCE_VALUES.md and independent float64 formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.diffusion import (
    Objective,
    denoising_loss,
    diffusion_loss,
    make_noise_scheduler,
    min_snr_weights,
    sample_noise,
    snr,
    training_target,
)

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
T = torch.tensor([0, 250, 500, 750, 900, 999])
# shared/REFERENCE_VALUES.md: abar, snr, w eps, w v (SD); abar', snr', w v (ZTSNR); gamma = 5.
REFERENCE = {
    0: (9.991500e-01, 1.175471e03, 0.004254, 0.004250, 9.991500e-01, 1.175471e03, 0.004250),
    250: (6.737926e-01, 2.065535e00, 1.000000, 0.673793, 6.524570e-01, 1.877342e00, 0.652457),
    500: (2.763327e-01, 3.818504e-01, 1.000000, 0.276333, 2.410188e-01, 3.175557e-01, 0.241019),
    750: (5.616985e-02, 5.951267e-02, 1.000000, 0.056170, 3.279912e-02, 3.391138e-02, 0.032799),
    900: (1.415114e-02, 1.435427e-02, 1.000000, 0.014151, 2.960393e-03, 2.969183e-03, 0.002960),
    999: (4.660099e-03, 4.681917e-03, 1.000000, 0.004660, 0.0, 0.0, 0.0),
}


def _reference_abar(zero_terminal_snr: bool) -> np.ndarray:
    """Independent float64 schedule, straight from the formulas (not from diffusers)."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    if zero_terminal_snr:  # Lin et al. 2023, Algorithm 1
        s = np.sqrt(abar)
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        abar = s**2
    return abar


def _reference_min_snr(snr_values: np.ndarray, gamma: float, kind: str) -> np.ndarray:
    """Hang et al. 2023, written independently, with the eps limit 1 at SNR 0."""
    out = np.empty_like(snr_values)
    for i, s in enumerate(snr_values):
        if kind == "epsilon":
            out[i] = 1.0 if s < gamma else gamma / s
        else:
            out[i] = min(s, gamma) / (s + 1.0)
    return out


@pytest.fixture(params=[False, True], ids=["sd", "ztsnr"])
def ztsnr(request):
    return request.param


def test_schedule_matches_reference_table(ztsnr):
    scheduler = make_noise_scheduler(SD_CONFIG, "v_prediction", ztsnr)
    abar = scheduler.alphas_cumprod.double()
    values = snr(scheduler, T).double()
    for i, t in enumerate(T.tolist()):
        ref = REFERENCE[t]
        ref_abar, ref_snr = (ref[4], ref[5]) if ztsnr else (ref[0], ref[1])
        assert abar[t].item() == pytest.approx(ref_abar, rel=1e-5, abs=1e-12)
        assert values[i].item() == pytest.approx(ref_snr, rel=1e-4, abs=1e-12)


def test_zero_terminal_snr_rescale():
    plain = make_noise_scheduler(SD_CONFIG, "v_prediction", False)
    rescaled = make_noise_scheduler(SD_CONFIG, "v_prediction", True)
    assert math.sqrt(plain.alphas_cumprod[-1].item()) == pytest.approx(0.068265, abs=1e-6)
    assert rescaled.alphas_cumprod[-1].item() == 0.0  # exactly, not merely small
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    np.testing.assert_allclose(rescaled.alphas_cumprod.double().numpy(), _reference_abar(True), rtol=2e-5, atol=1e-9)
    assert rescaled.config.timestep_spacing == "trailing"


# epsilon + zero terminal SNR is rejected at recipe load (test_recipes).
@pytest.mark.parametrize("kind,ztsnr", [("epsilon", False), ("v_prediction", False), ("v_prediction", True)])
def test_min_snr_weights_match_reference(kind, ztsnr):
    scheduler = make_noise_scheduler(SD_CONFIG, kind, ztsnr)
    t_all = torch.arange(1000)
    weights = min_snr_weights(snr(scheduler, t_all), 5.0, kind).double().numpy()
    abar = _reference_abar(ztsnr)
    with np.errstate(divide="ignore"):
        ref_snr = abar / (1.0 - abar)
    np.testing.assert_allclose(weights, _reference_min_snr(ref_snr, 5.0, kind), rtol=1e-4, atol=1e-7)
    column = {("epsilon", False): 2, ("v_prediction", False): 3, ("v_prediction", True): 6}[(kind, ztsnr)]
    for t in T.tolist():
        assert weights[t] == pytest.approx(REFERENCE[t][column], abs=2e-6)


def test_min_snr_is_finite_at_snr_zero():
    zero = torch.tensor([0.0, 1e-12, 5.0, 1e4])
    for kind in ("epsilon", "v_prediction"):
        assert torch.isfinite(min_snr_weights(zero, 5.0, kind)).all()
    assert min_snr_weights(zero, 5.0, "epsilon")[0].item() == 1.0
    assert min_snr_weights(zero, 5.0, "v_prediction")[0].item() == 0.0


def test_snr_table_follows_the_rescale():
    # The trap: an SNR table computed before the rescale gives 0.014151 at t=900.
    scheduler = make_noise_scheduler(SD_CONFIG, "v_prediction", True)
    w = min_snr_weights(snr(scheduler, torch.tensor([900])), 5.0, "v_prediction")
    assert w.item() == pytest.approx(0.002960, abs=2e-6)


def test_v_target_equals_get_velocity_and_the_formula():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    for ztsnr in (False, True):
        scheduler = make_noise_scheduler(SD_CONFIG, "v_prediction", ztsnr)
        target = training_target(scheduler, x0, noise, T)
        reference = DDPMScheduler(**SD_CONFIG, prediction_type="v_prediction", rescale_betas_zero_snr=ztsnr)
        torch.testing.assert_close(target, reference.get_velocity(x0, noise, T))
        abar = torch.from_numpy(_reference_abar(ztsnr))[T].view(-1, 1, 1, 1)
        formula = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()
        torch.testing.assert_close(target.double(), formula, rtol=1e-5, atol=1e-5)
    eps_scheduler = make_noise_scheduler(SD_CONFIG, "epsilon", False)
    assert torch.equal(training_target(eps_scheduler, x0, noise, T), noise)


def test_targets_are_fp32_for_half_precision_inputs():
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    scheduler = make_noise_scheduler(SD_CONFIG, "v_prediction", True)
    half = training_target(scheduler, x0.half(), noise.half(), T)
    assert half.dtype == torch.float32
    # The formula in float64 on the same (half-rounded) inputs: a product taken in
    # half precision would be off by ~1e-3, far outside this tolerance.
    abar = torch.from_numpy(_reference_abar(True))[T].view(-1, 1, 1, 1)
    exact = abar.sqrt() * noise.half().double() - (1 - abar).sqrt() * x0.half().double()
    torch.testing.assert_close(half.double(), exact, rtol=0, atol=2e-6)
    in_half = (abar.sqrt().half() * noise.half() - (1 - abar).sqrt().half() * x0.half()).double()
    assert (in_half - exact).abs().max() > 1e-4  # the tolerance tells the two apart


def test_noise_offset_shifts_channel_means():
    latents = torch.zeros(64, 4, 16, 16)
    plain = sample_noise(latents, 0.0, generator=torch.Generator().manual_seed(0))
    offset = sample_noise(latents, 0.5, generator=torch.Generator().manual_seed(0))
    # Per-(sample, channel) means: ~N(0, 1/256) without, ~N(0, 0.25 + 1/256) with the offset.
    assert plain.mean(dim=(2, 3)).std().item() < 0.1
    assert 0.35 < offset.mean(dim=(2, 3)).std().item() < 0.65


def test_weighted_loss_and_denoising_loss():
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    pred[1] *= 3
    assert diffusion_loss(pred, target).item() == pytest.approx((1 + 9) / 2)
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 4.5) / 2)

    scheduler = make_noise_scheduler(SD_CONFIG, "v_prediction", True)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 999])
    seen = {}

    def unet(noisy, timesteps, conditioning, return_dict):
        seen["noisy"] = noisy
        return (torch.zeros_like(noisy),)

    loss = denoising_loss(unet, scheduler, latents, None, noise, t, Objective(min_snr_gamma=5.0))
    # At t=999 with zero terminal SNR, x_t is pure noise and the v target is -x0.
    torch.testing.assert_close(seen["noisy"][1], noise[1])
    target = training_target(scheduler, latents, noise, t)
    torch.testing.assert_close(target[1], -latents[1])
    weights = min_snr_weights(snr(scheduler, t), 5.0, "v_prediction")
    expected = (target.pow(2).mean(dim=(1, 2, 3)) * weights).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_logit_normal_timesteps_have_the_stated_distribution():
    from sdtune.diffusion import sample_timesteps

    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(40000, "cpu", 0, 1000, "logit_normal", logit_mean=0.5, logit_std=0.8, generator=gen)
    u = (t.double() + 0.5) / 1000
    logits = torch.log(u / (1 - u))
    assert logits.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logits.std().item() == pytest.approx(0.8, abs=0.02)
    uniform = sample_timesteps(40000, "cpu", 200, 700, "uniform", generator=gen)
    assert uniform.min().item() == 200 and uniform.max().item() == 699
    ranged = sample_timesteps(40000, "cpu", 200, 700, "logit_normal", generator=gen)
    assert 200 <= ranged.min().item() and ranged.max().item() <= 699
    assert abs(ranged.double().mean().item() - 449.5) < 5


def test_noise_offset_random_strength_spreads_the_offset():
    latents = torch.zeros(4000, 4, 8, 8)
    fixed = sample_noise(latents, 0.5, generator=torch.Generator().manual_seed(0)).mean(dim=(2, 3))
    scaled = sample_noise(latents, 0.5, True, generator=torch.Generator().manual_seed(0)).mean(dim=(2, 3))
    # Offset std 0.5 fixed; with U(0,1) strength its variance is 0.25 * E[u^2] = 0.25 / 3.
    assert fixed.var().item() == pytest.approx(0.25 + 1 / 64, rel=0.1)
    assert scaled.var().item() == pytest.approx(0.25 / 3 + 1 / 64, rel=0.1)


def test_input_perturbation_changes_the_input_not_the_target():
    from sdtune.diffusion import perturb_noise

    scheduler = make_noise_scheduler(SD_CONFIG, "epsilon", False)
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([300, 600])
    perturbed = perturb_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert 0.05 < (perturbed - noise).std().item() < 0.15
    seen = {}

    def unet(noisy, timesteps, conditioning, return_dict):
        seen["noisy"] = noisy
        return (noise.clone(),)  # predicts the clean noise exactly

    loss = denoising_loss(unet, scheduler, latents, None, noise, t, input_noise=perturbed)
    torch.testing.assert_close(seen["noisy"], scheduler.add_noise(latents, perturbed, t))
    assert loss.item() == 0.0  # the target is the unperturbed noise


def test_debiased_weights():
    from sdtune.diffusion import debiased_weights

    scheduler = make_noise_scheduler(SD_CONFIG, "v_prediction", False)
    s = snr(scheduler, torch.arange(1000)).double()
    eps = debiased_weights(s, "epsilon").double()
    v = debiased_weights(s, "v_prediction").double()
    ref = 1.0 / np.sqrt(_reference_abar(False) / (1 - _reference_abar(False)))
    np.testing.assert_allclose(eps.numpy(), ref, rtol=1e-4)
    # Same weighting in epsilon terms: a v loss is (snr + 1) / snr times the epsilon loss.
    torch.testing.assert_close(v * (s + 1) / s, eps, rtol=1e-5, atol=0)
    zero = debiased_weights(torch.tensor([0.0]), "v_prediction")
    assert zero.item() == 0.0


def test_huber_losses_are_quadratic_near_zero_and_linear_far():
    from sdtune.diffusion import elementwise_loss

    small, large, zero = torch.tensor([1e-3]), torch.tensor([100.0]), torch.tensor([0.0])
    c = 0.1
    assert elementwise_loss(small, zero, "huber", c).item() == pytest.approx(1e-6, rel=1e-3)
    assert elementwise_loss(large, zero, "huber", c).item() == pytest.approx(2 * c * 100 - 2 * c * c, rel=1e-4)
    assert elementwise_loss(large, zero, "mse").item() == pytest.approx(1e4)
    torch.testing.assert_close(
        elementwise_loss(large, zero, "smooth_l1", c), elementwise_loss(large, zero, "huber", c) / c
    )
