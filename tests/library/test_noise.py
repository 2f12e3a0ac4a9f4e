"""Noise schedule, noise extras, timesteps and targets against hand-computed values; the noise flags' checks."""
from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from library.errors import FlagError
from library.options.model import add_model_arguments
from library.options.noise_loss import (
    add_noise_and_loss_arguments,
    check_noise_and_loss_flags,
    noise_settings_from_args,
)
from library.train.noise import (
    NoiseSettings,
    add_noise,
    apply_noise_offset,
    make_noise_scheduler,
    prepare_noisy_latents,
    prepare_validation_noisy_latents,
    pyramid_noise_like,
    rescale_zero_terminal_snr,
    sample_timesteps,
    training_target,
)


def kohya_alphas_cumprod() -> np.ndarray:
    """scaled_linear: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)², alpha_bar = cumprod(1 - beta)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_noise_and_loss_arguments(parser)
    return parser.parse_args(argv)


def test_scheduler_is_kohyas_schedule():
    scheduler = make_noise_scheduler(v_parameterization=False, zero_terminal_snr=False)
    expected = kohya_alphas_cumprod()
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), expected, rtol=1e-4)
    # alpha_bar_0 = 1 - 0.00085 = 0.99915, so SNR_0 = 0.99915 / 0.00085 = 1175.47
    assert scheduler.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert scheduler.all_snr[0].item() == pytest.approx(1175.47, rel=1e-3)
    assert scheduler.config.clip_sample is False


def test_zero_terminal_snr_zeroes_the_last_step_and_keeps_the_first():
    scheduler = make_noise_scheduler(v_parameterization=True, zero_terminal_snr=True)
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
    assert alphas_cumprod[-1] == 0.0  # Lin et al. 2023: SNR(T) = 0, pure noise at the last step
    assert alphas_cumprod[0] == pytest.approx(0.99915, abs=1e-6)
    assert np.all(np.diff(alphas_cumprod) < 0)
    # The paper's map is affine in sqrt(alpha_bar): s' = (s - s_T) * s_0 / (s_0 - s_T)
    sqrt_old = np.sqrt(kohya_alphas_cumprod())
    sqrt_new = (sqrt_old - sqrt_old[-1]) * sqrt_old[0] / (sqrt_old[0] - sqrt_old[-1])
    np.testing.assert_allclose(np.sqrt(alphas_cumprod), sqrt_new, atol=1e-5)
    # kohya keeps the SNR table of the original schedule for the loss weights
    np.testing.assert_allclose(scheduler.all_snr[-1].item(), kohya_alphas_cumprod()[-1] / (1 - kohya_alphas_cumprod()[-1]),
                               rtol=1e-3)


def test_rescale_matches_diffusers_implementation():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), diffusers_rescale(betas.clone()))


def test_noise_offset_adds_a_constant_per_sample_and_channel():
    noise, latents = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    result = apply_noise_offset(noise, latents, 0.1, generator=generator(0))
    per_channel = 0.1 * torch.randn((2, 4, 1, 1), generator=generator(0))  # the same draw, by hand
    torch.testing.assert_close(result, per_channel.expand(2, 4, 3, 3))
    assert result.std(dim=(2, 3)).max().item() == 0.0  # constant over H and W


def test_adaptive_noise_scale_grows_with_the_channel_mean_and_clamps_at_zero():
    noise, latents = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), -2.0)
    draw = torch.randn((1, 1, 1, 1), generator=generator(3))
    grown = apply_noise_offset(noise, latents, 0.1, adaptive_noise_scale=0.05, generator=generator(3))
    torch.testing.assert_close(grown, (0.1 + 0.05 * 2.0) * draw.expand(1, 1, 2, 2))  # offset 0.1 + 0.05·|-2|
    clamped = apply_noise_offset(noise, latents, 0.1, adaptive_noise_scale=-1.0, generator=generator(3))
    assert torch.equal(clamped, noise)  # 0.1 - 1·2 < 0 -> 0


def test_noise_offset_random_strength_scales_by_a_uniform_draw():
    g = generator(5)
    strength = torch.rand(1, generator=g).item()
    expected = 0.2 * strength * torch.randn((1, 2, 1, 1), generator=g)
    result = apply_noise_offset(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), 0.2, random_strength=True,
                                generator=generator(5))
    torch.testing.assert_close(result[..., :1, :1], expected)


def test_pyramid_noise_first_level_is_full_resolution_and_result_has_unit_std():
    noise = torch.randn(2, 4, 8, 8, generator=generator(1))
    g = generator(2)
    torch.rand(1, generator=g)  # level 0 draws its (unused) shrink factor: r**0 = 1
    summed = noise + torch.randn(2, 4, 8, 8, generator=g)
    result = pyramid_noise_like(noise, iterations=1, discount=0.3, generator=generator(2))
    torch.testing.assert_close(result, summed / summed.std())


def test_pyramid_noise_shape_std_and_determinism():
    noise = torch.randn(2, 4, 16, 12, generator=generator(1))
    first = pyramid_noise_like(noise, iterations=10, discount=0.3, generator=generator(7))
    second = pyramid_noise_like(noise, iterations=10, discount=0.3, generator=generator(7))
    assert first.shape == noise.shape and torch.equal(first, second)
    assert first.std().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(first, noise / noise.std())


def test_sample_timesteps_range_and_determinism():
    timesteps = sample_timesteps(1000, 5, 8, generator=generator(0))
    assert timesteps.dtype == torch.long and set(timesteps.tolist()) == {5, 6, 7}  # max is exclusive
    assert torch.equal(sample_timesteps(16, 0, 1000, generator(4)), sample_timesteps(16, 0, 1000, generator(4)))


def test_add_noise_is_the_forward_process():
    scheduler = make_noise_scheduler(False, False)
    latents, noise = torch.full((1, 1, 2, 2), 2.0), torch.ones(1, 1, 2, 2)
    alpha_bar = kohya_alphas_cumprod()[500]
    noisy = add_noise(scheduler, latents, noise, torch.tensor([500]))
    # sqrt(alpha_bar)·x0 + sqrt(1 - alpha_bar)·noise
    expected = alpha_bar**0.5 * 2.0 + (1 - alpha_bar) ** 0.5 * 1.0
    torch.testing.assert_close(noisy, torch.full((1, 1, 2, 2), expected, dtype=torch.float32), rtol=1e-4, atol=1e-5)


def test_input_perturbation_changes_the_input_but_not_the_target():
    scheduler = make_noise_scheduler(False, False)
    latents = torch.randn(2, 4, 4, 4, generator=generator(0))
    plain = prepare_noisy_latents(NoiseSettings(), scheduler, latents, generator(9))
    perturbed = prepare_noisy_latents(NoiseSettings(ip_noise_gamma=0.1), scheduler, latents, generator(9))
    assert torch.equal(plain.target, perturbed.target) and torch.equal(plain.noise, perturbed.target)
    assert not torch.allclose(plain.noisy_latents, perturbed.noisy_latents)


def test_v_target_is_the_velocity():
    scheduler = make_noise_scheduler(True, False)
    latents, noise = torch.full((1, 1, 2, 2), 2.0), torch.ones(1, 1, 2, 2)
    timesteps = torch.tensor([500])
    target = training_target(scheduler, latents, noise, timesteps, v_parameterization=True)
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps))
    alpha_bar = kohya_alphas_cumprod()[500]
    expected = alpha_bar**0.5 * 1.0 - (1 - alpha_bar) ** 0.5 * 2.0  # sqrt(a)·noise - sqrt(1-a)·x0
    assert target[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-4)
    assert training_target(scheduler, latents, noise, timesteps, v_parameterization=False) is noise


def test_prepare_noisy_latents_is_deterministic_and_honours_the_timestep_range():
    scheduler = make_noise_scheduler(False, False)
    settings = NoiseSettings(noise_offset=0.1, multires_noise_iterations=4, min_timestep=200, max_timestep=300)
    latents = torch.randn(8, 4, 8, 8, generator=generator(0))
    first = prepare_noisy_latents(settings, scheduler, latents, generator(1))
    second = prepare_noisy_latents(settings, scheduler, latents, generator(1))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first.timesteps.min().item() >= 200 and first.timesteps.max().item() < 300


def test_validation_batch_is_fixed_and_plain():
    scheduler = make_noise_scheduler(False, False)
    settings = NoiseSettings(noise_offset=1.0, ip_noise_gamma=1.0)
    latents = torch.randn(2, 4, 8, 8, generator=generator(0))
    torch.randn(10)  # moving the global RNG must not matter
    first = prepare_validation_noisy_latents(settings, scheduler, latents, timestep=500, seed=3)
    second = prepare_validation_noisy_latents(settings, scheduler, latents, timestep=500, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first.timesteps.tolist() == [500, 500]
    # no offset or perturbation: the noise is the seeded draw itself and the input is the plain forward process
    torch.testing.assert_close(first.noise, torch.randn(2, 4, 8, 8, generator=generator(3)))
    torch.testing.assert_close(first.noisy_latents, scheduler.add_noise(latents, first.noise, first.timesteps))


def test_noise_flags_defaults_and_settings():
    settings = noise_settings_from_args(parse(["--noise_offset", "0.05", "--v_parameterization"]))
    assert settings == NoiseSettings(v_parameterization=True, noise_offset=0.05)
    assert parse([]).multires_noise_discount == 0.3
    check_noise_and_loss_flags(parse([]))


@pytest.mark.parametrize("argv, message", [
    (["--min_timestep", "800", "--max_timestep", "500"],
     ("--min_timestep 800 / --max_timestep 500: expected min_timestep < max_timestep (timesteps are drawn from "
      "[min, max), max is exclusive)")),
    (["--min_timestep", "1000"], "--min_timestep 1000 / --max_timestep 1000: expected min_timestep < max_timestep"),
    (["--max_timestep", "1200"], "--max_timestep 1200: expected a timestep from 0 to 1000"),
    (["--adaptive_noise_scale", "0.01"],
     "--adaptive_noise_scale 0.01: needs --noise_offset (the adaptive part is added to the offset)"),
    (["--noise_offset", "-0.1"], "--noise_offset -0.1: expected a value >= 0"),
    (["--ip_noise_gamma", "-1"], "--ip_noise_gamma -1.0: expected a value >= 0"),
])
def test_bad_noise_flags_are_refused(argv, message):
    with pytest.raises(FlagError) as error:
        check_noise_and_loss_flags(parse(argv))
    assert str(error.value).startswith(message)


def test_zero_terminal_snr_without_v_parameterization_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="library.options.noise_loss"):
        check_noise_and_loss_flags(parse(["--zero_terminal_snr"]))
    assert "--zero_terminal_snr without --v_parameterization" in caplog.text
