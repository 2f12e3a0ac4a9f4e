"""Noise and loss flags of the training scripts, observed on what they change: the noise, the noisy U-Net input
and the per-sample loss weight of the trainer's own per-batch hooks (StepHooks._noisy_batch, post_process_loss),
with the flags parsed by train_network.py's parser and the loop's seeded per-sample generators."""
from __future__ import annotations

import math

import pytest
import torch

import train_network
from library.train.noise import make_noise_scheduler
from library.train.step_hooks import NoisePlan, StepHooks


def parse(*flags: str):
    return train_network.setup_parser().parse_args(list(flags))


@pytest.fixture(scope="module")
def scheduler():
    return make_noise_scheduler(v_parameterization=False, zero_terminal_snr=False)


def noisy_batches(args, scheduler, latents: torch.Tensor, steps: int):
    """The trainer's noisy batch for `steps` consecutive training steps (seed 1, one sample per step)."""
    hooks = StepHooks()
    batches = []
    for step in range(steps):
        hooks.noise_plan = NoisePlan(seed=1, global_step=step, first_slot=0)
        batches.append(hooks._noisy_batch(args, scheduler, latents))
    return batches


def test_noise_offset_random_strength_draws_the_offset_between_zero_and_noise_offset(scheduler):
    latents = torch.zeros(1, 4, 8, 8)
    fixed = noisy_batches(parse("--noise_offset", "1.0"), scheduler, latents, 200)
    random_strength = noisy_batches(parse("--noise_offset", "1.0", "--noise_offset_random_strength"), scheduler,
                                    latents, 200)
    assert not torch.equal(fixed[0].noise, random_strength[0].noise)

    def channel_mean_power(batches) -> float:
        # the spatial mean of a channel is offset * N(0,1) plus the mean of 64 unit draws (variance 1/64)
        means = torch.cat([batch.noise.mean(dim=(2, 3)).flatten() for batch in batches])
        return float((means ** 2).mean())

    # E[offset^2] = 1 for the fixed offset, E[(U * 1)^2] = 1/3 for a uniform strength; each + 1/64
    assert channel_mean_power(fixed) == pytest.approx(1 + 1 / 64, rel=0.2)
    assert channel_mean_power(random_strength) == pytest.approx(1 / 3 + 1 / 64, rel=0.2)


def test_ip_noise_gamma_random_strength_draws_the_perturbation_strength_per_step(scheduler):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def perturbation_strengths(*flags: str) -> torch.Tensor:
        strengths = []
        for batch in noisy_batches(parse("--ip_noise_gamma", "0.5", *flags), scheduler, latents, 60):
            plain = scheduler.add_noise(latents, batch.noise, batch.timesteps)  # the input without perturbation
            sigma = (1 - scheduler.alphas_cumprod[batch.timesteps]).sqrt().view(-1, 1, 1, 1)
            strengths.append(float(((batch.noisy_latents - plain) / sigma).std()))
            assert torch.equal(batch.target, batch.noise)  # never in the target
        return torch.tensor(strengths)

    fixed = perturbation_strengths()
    drawn = perturbation_strengths("--ip_noise_gamma_random_strength")
    assert torch.allclose(fixed, torch.full_like(fixed, 0.5), rtol=0.12)  # always --ip_noise_gamma
    assert float(drawn.max()) <= 0.5 * 1.12
    assert float(drawn.min()) < 0.1 and float(drawn.max()) > 0.4  # U(0, 1) * 0.5: spread over the range
    assert float(drawn.mean()) == pytest.approx(0.25, abs=0.07)


def test_multires_noise_iterations_makes_the_noise_spatially_correlated(scheduler):
    latents = torch.zeros(1, 4, 32, 32)

    def neighbour_correlation(batches) -> float:
        noise = torch.cat([batch.noise for batch in batches])
        left, right = noise[..., :-1].flatten(), noise[..., 1:].flatten()
        return float(torch.corrcoef(torch.stack([left, right]))[0, 1])

    plain = noisy_batches(parse(), scheduler, latents, 10)
    multires = noisy_batches(parse("--multires_noise_iterations", "6", "--multires_noise_discount", "0.8"),
                             scheduler, latents, 10)
    assert abs(neighbour_correlation(plain)) < 0.03  # white noise
    assert neighbour_correlation(multires) > 0.15  # upsampled coarse levels (measured 0.25)
    for batch in multires:
        assert float(batch.noise.std()) == pytest.approx(1.0, abs=1e-4)  # rescaled to unit std
    assert not torch.equal(plain[0].noise, multires[0].noise)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_debiased_estimation_loss_weights_each_sample_by_its_snr(scheduler, v_prediction):
    timesteps = torch.tensor([0, 10, 500, 990])
    loss = torch.ones(4)
    extra = ("--v_parameterization",) if v_prediction else ()
    hooks = StepHooks()
    plain = hooks.post_process_loss(loss.clone(), parse(*extra), timesteps, scheduler)
    debiased = hooks.post_process_loss(loss.clone(), parse("--debiased_estimation_loss", *extra), timesteps,
                                       scheduler)
    assert torch.equal(plain, loss)
    snr = torch.clamp(scheduler.all_snr[timesteps], max=1000.0).double()
    expected = 1 / (snr + 1) if v_prediction else 1 / snr.sqrt()
    torch.testing.assert_close(debiased.double(), expected, rtol=1e-5, atol=0)
    # small timesteps (high SNR) count far less than large ones
    assert float(debiased[0]) < float(debiased[2]) < float(debiased[3])
    if not v_prediction:
        assert float(debiased[0]) == pytest.approx(1 / math.sqrt(1000.0), rel=1e-5)  # SNR capped at 1000
