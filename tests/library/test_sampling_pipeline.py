"""Sampler names, the sample pipeline on tiny SD1/SDXL models, sample files during training and their schedule."""
from __future__ import annotations

import argparse
import random
import re
from datetime import datetime

import numpy as np
import pytest
import torch

from library.errors import FlagError
from library.sampling.pipeline import generate
from library.sampling.prompts import SamplePrompt
from library.sampling.samplers import SAMPLER_NAMES, SD_SCHEDULE, make_sampler, sampler_config
from library.train.sample_during_training import sample_file_name, sample_images, should_sample

EXPECTED_CLASSES = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}


def _scipy_missing() -> bool:
    from diffusers.utils import is_scipy_available

    return not is_scipy_available()


@pytest.mark.parametrize("name", EXPECTED_CLASSES)
def test_every_kohya_sampler_name_builds_its_scheduler_with_sd_betas(name):
    expected_class = EXPECTED_CLASSES[name]
    if expected_class == "LMSDiscreteScheduler" and _scipy_missing():
        with pytest.raises(FlagError, match=f"sampler {name}: diffusers' LMS scheduler needs scipy; install it"):
            make_sampler(name, v_parameterization=False)
        return
    scheduler = make_sampler(name, v_parameterization=False)
    assert type(scheduler).__name__ == expected_class
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.num_train_timesteps == 1000
    # scaled_linear: beta_t = (sqrt(0.00085) + t/999 * (sqrt(0.012) - sqrt(0.00085)))^2
    assert scheduler.betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert scheduler.betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    assert scheduler.betas[500].item() == pytest.approx((0.00085**0.5 + 500 / 999 * (0.012**0.5 - 0.00085**0.5))**2,
                                                        rel=1e-5)


def test_k_aliases_mean_the_same_sampler_and_names_are_case_insensitive():
    aliases = [name for name in SAMPLER_NAMES if name.startswith("k_")]
    assert aliases == ["k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"]
    for alias in aliases:
        assert sampler_config(alias, True) == sampler_config(alias.removeprefix("k_"), True)
    assert sampler_config("Euler_A", False) == ("EulerAncestralDiscreteScheduler", {**SD_SCHEDULE})


def test_dpmsolver_names_pick_the_algorithm_and_v_parameterization_sets_the_prediction_type():
    assert make_sampler("dpmsolver", False).config.algorithm_type == "dpmsolver"
    assert make_sampler("dpmsolver++", False).config.algorithm_type == "dpmsolver++"
    for name in ("ddim", "euler_a", "dpm_2", "dpmsingle"):
        assert make_sampler(name, v_parameterization=True).config.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])  # heun has no rescale flag: trained betas
def test_zero_terminal_snr_makes_the_last_timestep_almost_pure_noise(name):
    plain = make_sampler(name, True)
    rescaled = make_sampler(name, True, zero_terminal_snr=True)
    assert plain.alphas_cumprod[-1].item() == pytest.approx(0.00466, rel=1e-2)
    assert rescaled.alphas_cumprod[-1].item() < 1e-6
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-4)


def test_unknown_sampler_names_the_flag_and_the_nearest_name():
    with pytest.raises(FlagError) as error:
        make_sampler("eulr_a", False)
    assert str(error.value) == ("--sample_sampler eulr_a: unknown sampler; expected one of "
                                + ", ".join(SAMPLER_NAMES) + "; did you mean euler_a?")


@pytest.fixture(scope="module")
def tiny_pipelines(tiny_models):
    from library.text.conditioning import CaptionEncoder
    from library.text.tokenize import load_tokenizers

    pipelines = {}
    for family_name in ("sd1", "sdxl"):
        bundle = tiny_models.bundle(family_name)
        encoder = CaptionEncoder(bundle.family, load_tokenizers(bundle.family), bundle.text_encoders)
        pipelines[family_name] = (bundle, encoder)
    return pipelines


def _generate(pipeline, request: SamplePrompt, sampler: str = "euler", seed: int | None = None):
    bundle, encoder = pipeline
    return generate(request, family=bundle.family, unet=bundle.unet, vae=bundle.vae, caption_encoder=encoder,
                    sampler_name=sampler, device="cpu", dtype=torch.float32, default_size=(64, 64),
                    generator_seed=seed, show_progress=False)


@pytest.mark.parametrize("family_name", ["sd1", "sdxl"])
def test_generate_is_repeatable_per_seed_and_has_the_requested_size(tiny_pipelines, family_name):
    pipeline = tiny_pipelines[family_name]
    request = SamplePrompt("a red circle", negative_prompt="blurry", seed=3, steps=2)
    first = np.asarray(_generate(pipeline, request))
    again = np.asarray(_generate(pipeline, request))
    other_seed = np.asarray(_generate(pipeline, request, seed=4))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other_seed.astype(int)).max() > 0
    wide = _generate(pipeline, SamplePrompt("a red circle", width=100, height=64, steps=1, scale=1.0), seed=1)
    assert wide.size == (96, 64)  # width floored to a multiple of 8


def test_generate_leaves_the_models_training_flags_as_it_found_them(tiny_pipelines):
    bundle, _ = tiny_pipelines["sd1"]
    bundle.unet.train()
    bundle.unet.conv_in.eval()
    try:
        _generate(tiny_pipelines["sd1"], SamplePrompt("x", seed=0, steps=1), sampler="ddim")
        assert bundle.unet.training and not bundle.unet.conv_in.training and bundle.unet.conv_out.training
        assert not bundle.vae.training
    finally:
        bundle.unet.eval()


def test_sample_images_writes_kohya_names_and_restores_every_rng(tiny_pipelines, tmp_path):
    bundle, encoder = tiny_pipelines["sdxl"]
    prompts = [SamplePrompt("a red circle", seed=11, steps=1, index=0),
               SamplePrompt("a blue square", steps=1, index=1, sampler="ddim"),
               SamplePrompt("a green star", steps=1, index=2, width=72)]
    args = argparse.Namespace(output_dir=str(tmp_path), output_name="lora", sample_sampler="euler_a")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    paths = sample_images(args, family=bundle.family, unet=bundle.unet, vae=bundle.vae, caption_encoder=encoder,
                          prompts=prompts, epoch=None, global_step=12, device="cpu", dtype=torch.float32,
                          default_size=(64, 64), process_index=0, num_processes=2)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])
    assert [path.parent for path in paths] == [tmp_path / "sample"] * 2
    assert re.fullmatch(r"lora_000012_00_\d{14}_11\.png", paths[0].name)
    assert re.fullmatch(r"lora_000012_02_\d{14}\.png", paths[1].name)  # index 1 belongs to process 1; no seed
    from PIL import Image

    assert Image.open(paths[1]).size == (72, 64)
    assert sorted(path.name for path in (tmp_path / "sample").iterdir()) == sorted(path.name for path in paths)


def test_sample_file_name_golden_values():
    when = datetime(2024, 5, 6, 7, 8, 9)
    assert sample_file_name("lora", epoch=3, step=120, index=4, seed=42, when=when) == \
        "lora_e000003_04_20240506070809_42.png"
    assert sample_file_name("lora", epoch=None, step=120, index=0, seed=None, when=when) == \
        "lora_000120_00_20240506070809.png"
    assert sample_file_name(None, epoch=0, step=0, index=12, seed=None, when=when) == "e000000_12_20240506070809.png"


def _flags(every_n_steps=None, every_n_epochs=None, at_first=False, prompts="p.txt"):
    return argparse.Namespace(sample_every_n_steps=every_n_steps, sample_every_n_epochs=every_n_epochs,
                              sample_at_first=at_first, sample_prompts=prompts)


@pytest.mark.parametrize("flags, epoch, step, at_first, expected", [
    (_flags(every_n_steps=5), None, 10, False, True),
    (_flags(every_n_steps=5), None, 11, False, False),
    (_flags(every_n_steps=5), 2, 10, False, False),        # epoch ends only sample with --sample_every_n_epochs
    (_flags(every_n_epochs=2), 2, 10, False, True),
    (_flags(every_n_epochs=2), 3, 10, False, False),
    (_flags(every_n_steps=5, every_n_epochs=2), None, 10, False, False),  # epochs win over steps
    (_flags(every_n_steps=5, every_n_epochs=2), 4, 7, False, True),
    (_flags(every_n_steps=5), 0, 0, True, False),          # before step 1 only with --sample_at_first
    (_flags(at_first=True), 0, 0, True, True),
    (_flags(every_n_steps=5, prompts=None), None, 10, False, False),  # no --sample_prompts, nothing to do
    (_flags(), 1, 10, False, False),
])
def test_should_sample_follows_kohyas_schedule(flags, epoch, step, at_first, expected):
    assert should_sample(flags, epoch=epoch, global_step=step, at_first=at_first) is expected


def test_sampling_flags_have_kohyas_defaults_and_choices():
    from library.options.sampling import add_sampling_arguments

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    args = parser.parse_args([])
    assert (args.sample_every_n_steps, args.sample_every_n_epochs, args.sample_at_first, args.sample_prompts,
            args.sample_sampler) == (None, None, False, None, "ddim")
    parsed = parser.parse_args(["--sample_sampler", "k_euler_a", "--sample_every_n_steps", "50"])
    assert (parsed.sample_sampler, parsed.sample_every_n_steps) == ("k_euler_a", 50)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sample_every_n_epochs", "0"])
