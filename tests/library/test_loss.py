"""Loss formulas and SNR weightings against hand-computed values; the order of training_loss; the loss flags."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from library.errors import FlagError
from library.options.model import add_model_arguments
from library.options.noise_loss import add_noise_and_loss_arguments, check_noise_and_loss_flags, loss_settings_from_args
from library.train.loss import (
    LossSettings,
    add_v_prediction_like_loss,
    apply_debiased_estimation,
    apply_masked_loss,
    apply_snr_weight,
    conditional_loss,
    huber_c_for_timesteps,
    mask_from_conditioning_images,
    scale_v_prediction_loss_like_noise_prediction,
    training_loss,
)
from library.train.noise import make_noise_scheduler

TIMESTEPS = torch.tensor([0, 500, 999])


@pytest.fixture(scope="module")
def scheduler():
    return make_noise_scheduler(v_parameterization=False, zero_terminal_snr=False)


def kohya_snr(timesteps: list[int]) -> np.ndarray:
    """SNR = alpha_bar / (1 - alpha_bar) of kohya's scaled_linear schedule, computed independently in numpy."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_noise_and_loss_arguments(parser)
    return parser.parse_args(argv)


def test_l2_and_l1_are_elementwise():
    prediction, target = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    torch.testing.assert_close(conditional_loss(prediction, target, "l2"), torch.tensor([1.0, 9.0, 0.0]))
    torch.testing.assert_close(conditional_loss(prediction, target, "l1"), torch.tensor([1.0, 3.0, 0.0]))


def test_huber_and_smooth_l1_at_known_c():
    difference = torch.tensor([0.0, 1.0, 3.0])
    # huber, c=1: 2·1·(sqrt(d² + 1) - 1) = [0, 2(√2 - 1), 2(√10 - 1)]
    expected_huber = torch.tensor([0.0, 2 * (math.sqrt(2) - 1), 2 * (math.sqrt(10) - 1)])
    torch.testing.assert_close(conditional_loss(difference, torch.zeros(3), "huber", 1.0), expected_huber)
    # smooth_l1, c=0.5: 2·(sqrt(d² + 0.25) - 0.5); d=1 -> 2·(1.118034 - 0.5) = 1.236068
    smooth = conditional_loss(difference, torch.zeros(3), "smooth_l1", 0.5)
    assert smooth[1].item() == pytest.approx(1.236068, abs=1e-6)


def test_huber_c_is_per_sample():
    prediction = torch.ones(2, 1, 1, 1)  # d = 1 in both samples
    loss = conditional_loss(prediction, torch.zeros(2, 1, 1, 1), "huber", torch.tensor([1.0, 0.5]))
    # c=1: 2(√2 - 1) = 0.828427; c=0.5: 2·0.5·(sqrt(1.25) - 0.5) = 0.618034
    assert loss.flatten().tolist() == pytest.approx([0.828427, 0.618034], abs=1e-6)


def test_unknown_loss_type_names_the_nearest_choice():
    with pytest.raises(FlagError, match=r"^--loss_type hubber: unknown; expected one of l2, l1, huber, smooth_l1; "
                                        r"did you mean huber\?$"):
        conditional_loss(torch.zeros(1), torch.zeros(1), "hubber", 0.1)


def test_huber_c_schedules(scheduler):
    constant = huber_c_for_timesteps(TIMESTEPS, scheduler, "constant", 0.1, 2.0)
    assert constant.tolist() == pytest.approx([0.2] * 3)  # c · scale
    # exponential: scale · c^(t/1000): t=0 -> 2, t=500 -> 2·√0.1 = 0.632456, t=1000 -> 0.2
    exponential = huber_c_for_timesteps(torch.tensor([0, 500, 1000]), scheduler, "exponential", 0.1, 2.0)
    assert exponential.tolist() == pytest.approx([2.0, 0.632456, 0.2], rel=1e-5)
    # snr: (1 - c)/(1 + sigma)² + c with sigma = sqrt(1/snr); huber_scale is ignored (kohya)
    sigmas = np.sqrt(1.0 / kohya_snr([0, 500, 999]))
    expected = 0.9 / (1 + sigmas) ** 2 + 0.1
    snr_schedule = huber_c_for_timesteps(TIMESTEPS, scheduler, "snr", 0.1, 2.0)
    np.testing.assert_allclose(snr_schedule.numpy(), expected, rtol=1e-4)


def test_min_snr_weights_at_0_500_999(scheduler):
    snr = kohya_snr([0, 500, 999])  # about [1175.5, 0.3819, 0.00468]
    ones = torch.ones(3)
    epsilon = apply_snr_weight(ones, TIMESTEPS, scheduler, gamma=5.0)
    np.testing.assert_allclose(epsilon.numpy(), np.minimum(snr, 5) / snr, rtol=1e-4)
    assert epsilon[0].item() == pytest.approx(5 / 1175.47, rel=1e-3) and epsilon[2].item() == pytest.approx(1.0)
    v_prediction = apply_snr_weight(ones, TIMESTEPS, scheduler, gamma=5.0, v_prediction=True)
    np.testing.assert_allclose(v_prediction.numpy(), np.minimum(snr, 5) / (snr + 1), rtol=1e-4)


def test_min_snr_stays_finite_with_zero_terminal_snr():
    scheduler = make_noise_scheduler(v_parameterization=False, zero_terminal_snr=True)
    weight = apply_snr_weight(torch.ones(1), torch.tensor([999]), scheduler, gamma=5.0)
    assert weight.item() == pytest.approx(1.0)  # kohya's SNR table predates the rescale


def test_v_prediction_scalings(scheduler):
    snr = np.minimum(kohya_snr([0, 500, 999]), 1000)  # kohya caps the SNR at 1000 here (t=0: 1175 -> 1000)
    ones = torch.ones(3)
    scaled = scale_v_prediction_loss_like_noise_prediction(ones, TIMESTEPS, scheduler)
    np.testing.assert_allclose(scaled.numpy(), snr / (snr + 1), rtol=1e-4)
    assert scaled[0].item() == pytest.approx(1000 / 1001)
    added = add_v_prediction_like_loss(ones, TIMESTEPS, scheduler, v_pred_like_loss=0.5)
    np.testing.assert_allclose(added.numpy(), 1 + (snr + 1) / snr * 0.5, rtol=1e-4)  # loss + loss/scale·k


def test_debiased_estimation(scheduler):
    snr = np.minimum(kohya_snr([0, 500, 999]), 1000)
    ones = torch.ones(3)
    np.testing.assert_allclose(apply_debiased_estimation(ones, TIMESTEPS, scheduler).numpy(), 1 / np.sqrt(snr),
                               rtol=1e-4)
    v_prediction = apply_debiased_estimation(ones, TIMESTEPS, scheduler, v_prediction=True)
    np.testing.assert_allclose(v_prediction.numpy(), 1 / (snr + 1), rtol=1e-4)
    assert apply_debiased_estimation(ones, TIMESTEPS, scheduler)[0].item() == pytest.approx(1 / math.sqrt(1000))


def test_masked_loss_is_area_resized_to_the_latent():
    loss = torch.ones(1, 4, 2, 2)
    mask = torch.zeros(1, 4, 4)
    mask[:, :2, :2] = 1.0  # top-left quarter of the image
    mask[:, 2:, :2] = 0.5  # bottom-left at half weight
    masked = apply_masked_loss(loss, mask)
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.0]]).expand(1, 4, 2, 2)  # area average of each 2x2 block
    torch.testing.assert_close(masked, expected)


def test_masked_out_pixels_do_not_count_but_stay_in_the_mean(scheduler):
    target = torch.zeros(1, 4, 2, 2)
    prediction = target.clone()
    prediction[..., :, 1] = 10.0  # wrong only in the right column...
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # ...which is masked out
    settings = LossSettings()
    zero = training_loss(settings, prediction, target, TIMESTEPS[:1], scheduler, torch.ones(1), alpha_masks=mask)
    assert zero.item() == 0.0
    # error 1 everywhere, half the pixels masked: kohya divides by all pixels, so 0.5 and not 1.0
    half = training_loss(settings, target + 1, target, TIMESTEPS[:1], scheduler, torch.ones(1), alpha_masks=mask)
    assert half.item() == pytest.approx(0.5)


def test_conditioning_image_mask_maps_minus_one_to_zero():
    images = torch.stack([torch.full((2, 2), -1.0), torch.full((2, 2), 1.0), torch.zeros(2, 2)]).unsqueeze(0)
    torch.testing.assert_close(mask_from_conditioning_images(images), torch.zeros(1, 2, 2))


def test_training_loss_weights_each_sample_before_the_batch_mean(scheduler):
    # sample 0: error 1 at t=0 (Min-SNR weight 5/1175.47), weight 1 (train image)
    # sample 1: error 2 at t=999 (Min-SNR weight 1), weight 0.5 (regularisation image, prior_loss_weight 0.5)
    target = torch.zeros(2, 4, 2, 2)
    prediction = torch.cat([torch.full((1, 4, 2, 2), 1.0), torch.full((1, 4, 2, 2), 2.0)])
    timesteps, loss_weights = torch.tensor([0, 999]), torch.tensor([1.0, 0.5])
    settings = LossSettings(min_snr_gamma=5.0)
    snr_weight = np.minimum(kohya_snr([0, 999]), 5) / kohya_snr([0, 999])
    # per sample: [1·1·w0, 4·0.5·w1], then the batch mean
    expected = (1.0 * 1.0 * snr_weight[0] + 4.0 * 0.5 * snr_weight[1]) / 2
    loss = training_loss(settings, prediction, target, timesteps, scheduler, loss_weights)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # weighting the batch mean instead would give mean(l)·mean(w)·mean(snr_w) = 2.5·0.75·0.502 = 0.94
    assert loss.item() != pytest.approx(2.5 * 0.75 * snr_weight.mean(), rel=1e-2)


def test_training_loss_combines_huber_and_weightings(scheduler):
    target = torch.zeros(1, 1, 2, 2)
    prediction = torch.ones(1, 1, 2, 2)
    settings = LossSettings(loss_type="huber", huber_schedule="constant", huber_c=1.0, debiased_estimation_loss=True,
                            v_pred_like_loss=0.5)
    loss = training_loss(settings, prediction, target, torch.tensor([0]), scheduler, torch.ones(1))
    # huber c=1, d=1: 2(√2 - 1); SNR capped at 1000: v-pred-like × (1 + 1001/1000·0.5), debiased × 1/√1000
    expected = 2 * (math.sqrt(2) - 1) * (1 + 1001 / 1000 * 0.5) / math.sqrt(1000)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_flags_defaults_and_settings():
    args = parse(["--loss_type", "huber", "--min_snr_gamma", "5", "--v_parameterization"])
    assert loss_settings_from_args(args) == LossSettings(v_parameterization=True, loss_type="huber", min_snr_gamma=5.0)
    defaults = parse([])
    assert (defaults.loss_type, defaults.huber_schedule, defaults.huber_c, defaults.huber_scale) == ("l2", "snr", 0.1,
                                                                                                    1.0)


@pytest.mark.parametrize("argv, message", [
    (["--scale_v_pred_loss_like_noise_pred"],
     "--scale_v_pred_loss_like_noise_pred: needs --v_parameterization (it rescales a v-prediction loss)"),
    (["--v_pred_like_loss", "0.1", "--v_parameterization"],
     "--v_pred_like_loss 0.1: cannot be used with --v_parameterization"),
    (["--min_snr_gamma", "0"], "--min_snr_gamma 0.0: expected a value > 0 (5 is the paper's value)"),
    (["--loss_type", "huber", "--huber_c", "-1"], "--huber_c -1.0: expected a value > 0 for --loss_type huber"),
    (["--huber_scale", "-2"], "--huber_scale -2.0: expected a value >= 0"),
])
def test_bad_loss_flags_are_refused(argv, message):
    with pytest.raises(FlagError) as error:
        check_noise_and_loss_flags(parse(argv))
    assert str(error.value).startswith(message)


def test_loss_type_from_a_config_file_is_checked():
    args = parse([])
    args.huber_schedule = "exponental"  # --config_file values bypass argparse choices (COMPAT §11)
    with pytest.raises(FlagError, match="did you mean exponential"):
        check_noise_and_loss_flags(args)
