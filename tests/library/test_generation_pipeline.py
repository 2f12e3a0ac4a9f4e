"""The batched generation pipeline on tiny models: seeds, batching, samplers, img2img, inpainting, guidance rescale,
weighted and long prompts as the generators encode them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from library.sampling import img2img
from library.sampling.pipeline import (
    GuidanceConds,
    ImageJob,
    RenderSettings,
    SizeConditioning,
    decode_latents,
    encode_guidance_conds,
    generate_batch,
    guided_prediction,
    rescale_guidance,
)
from library.sampling.samplers import SAMPLER_NAMES
from library.text.encode import encode_chunks
from library.text.prompt_weights import tokenize_weighted

SETTINGS = RenderSettings(device=torch.device("cpu"), dtype=torch.float32, max_chunks=3, show_progress=False)


@pytest.fixture(scope="module")
def sd1(tiny_models):
    from library.text.conditioning import CaptionEncoder
    from library.text.tokenize import load_tokenizers

    bundle = tiny_models.bundle("sd1")
    return bundle, CaptionEncoder(bundle.family, load_tokenizers(bundle.family), bundle.text_encoders)


@pytest.fixture(scope="module")
def sdxl(tiny_models):
    from library.text.conditioning import CaptionEncoder
    from library.text.tokenize import load_tokenizers

    bundle = tiny_models.bundle("sdxl")
    return bundle, CaptionEncoder(bundle.family, load_tokenizers(bundle.family), bundle.text_encoders)


def _job(**changes) -> ImageJob:
    values = dict(prompt="a red circle", negative_prompt="blurry", seed=1, width=64, height=64, steps=3, scale=5.0,
                  sampler="euler_a")
    values.update(changes)
    return ImageJob(**values)


def _render(pipeline, jobs, settings=SETTINGS) -> list[np.ndarray]:
    bundle, encoder = pipeline
    images = generate_batch(jobs, unet=bundle.unet, vae=bundle.vae, caption_encoder=encoder,
                            vae_scale_factor=bundle.family.vae_scale_factor, settings=settings)
    return [np.asarray(image).astype(int) for image in images]


def test_a_seed_gives_the_same_image_alone_and_inside_a_batch(sd1):
    alone = _render(sd1, [_job(seed=7)])[0]
    again = _render(sd1, [_job(seed=7)])[0]
    in_batch = _render(sd1, [_job(seed=3, prompt="a blue square"), _job(seed=7)])
    assert np.array_equal(alone, again)
    # batched matmuls may round differently from single ones; an image must not change beyond that
    assert np.abs(in_batch[1] - alone).max() <= 2
    assert np.abs(in_batch[0] - alone).max() > 10


def test_jobs_of_one_batch_must_share_size_steps_and_sampler(sd1):
    with pytest.raises(ValueError, match="must share"):
        _render(sd1, [_job(), _job(steps=4)])


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_name_renders_a_batch(sd1, sampler):
    if sampler in ("lms", "k_lms"):
        pytest.importorskip("scipy")
    images = _render(sd1, [_job(sampler=sampler, steps=2, seed=1), _job(sampler=sampler, steps=2, seed=2)])
    assert [image.shape for image in images] == [(64, 64, 3)] * 2
    assert np.abs(images[0] - images[1]).max() > 0


def _init_image(size=(64, 64)) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_img2img_strength_zero_returns_the_init_image_unchanged(sd1):
    image = _init_image()
    result = _render(sd1, [_job(init_image=image, strength=0.0)])[0]
    assert np.array_equal(result, np.asarray(image).astype(int))


def test_img2img_strength_picks_the_last_steps_of_the_schedule(sd1):
    from library.sampling.samplers import make_sampler

    scheduler = make_sampler("ddim", False)
    scheduler.set_timesteps(10)
    timesteps, start = img2img.strength_timesteps(scheduler, 10, 0.3)
    assert start == 7 and timesteps.tolist() == scheduler.timesteps[7:].tolist()
    image = _init_image()
    weak = _render(sd1, [_job(init_image=image, strength=0.3, steps=10)])[0]
    strong = _render(sd1, [_job(init_image=image, strength=0.9, steps=10)])[0]
    assert weak.shape == strong.shape == (64, 64, 3)
    assert np.abs(weak - strong).max() > 0


def test_inpainting_keeps_black_and_repaints_white(sd1):
    bundle, _ = sd1
    image = _init_image()
    black = Image.new("L", (64, 64), 0)
    white = Image.new("L", (64, 64), 255)
    kept = _render(sd1, [_job(init_image=image, mask=black, strength=0.8, steps=4)])[0]
    pixels = img2img.image_to_tensor(image, (64, 64))
    clean = img2img.encode_images(bundle.vae, pixels, bundle.family.vae_scale_factor)
    round_trip = np.asarray(decode_latents(bundle.vae, clean, bundle.family.vae_scale_factor)[0]).astype(int)
    assert np.abs(kept - round_trip).max() <= 1  # everything kept: the image through the VAE
    repainted = _render(sd1, [_job(init_image=image, mask=white, strength=0.8, steps=4)])[0]
    plain = _render(sd1, [_job(init_image=image, strength=0.8, steps=4)])[0]
    assert np.abs(repainted - plain).max() <= 1  # everything repainted: plain img2img


def test_latent_mask_is_white_for_repaint_at_latent_size():
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (32, 0, 64, 32))
    latent = img2img.latent_mask(mask, (4, 8))
    assert latent.shape == (1, 1, 4, 8)
    assert latent[..., :3].max() == 0 and latent[..., 5:].min() == 1


def test_guidance_rescale_matches_the_positive_std_at_one_and_is_a_blend_between():
    torch.manual_seed(0)
    positive, guided = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8) * 3
    full = rescale_guidance(guided, positive, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), positive.std(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.equal(rescale_guidance(guided, positive, 0.0), guided)
    half = rescale_guidance(guided, positive, 0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * guided)


def test_generator_prompts_are_weighted_with_the_mean_restored(sd1):
    bundle, encoder = sd1
    tokenizer = encoder.tokenizers[0]
    prompt = "a (red:1.5) circle"
    encoded = encoder.encode_prompts([prompt], max_chunks=3).hidden_states
    ids, weights = tokenize_weighted(tokenizer, [prompt], n_chunks=1)
    plain = encode_chunks(bundle.text_encoders[0], ids).hidden_states
    expected = plain.clone()
    red = tokenizer("red", add_special_tokens=False).input_ids
    position = ids[0, 0].tolist().index(red[0])
    assert weights[0, 0, position] == pytest.approx(1.5)
    expected[0, position] *= 1.5
    expected *= plain.mean() / expected.mean()
    assert torch.allclose(encoded, expected, atol=1e-5)


def test_long_prompts_use_as_many_chunks_as_needed_up_to_the_limit(sd1):
    _, encoder = sd1
    long_prompt = " ".join(["cat"] * 100)  # 100 tokens: two 75-token windows
    assert encoder.encode_prompts(["a cat"], max_chunks=3).hidden_states.shape[1] == 77
    assert encoder.encode_prompts([long_prompt], max_chunks=3).hidden_states.shape[1] == 152
    assert encoder.encode_prompts([long_prompt, "a cat"], max_chunks=3).hidden_states.shape[1] == 152
    assert encoder.encode_prompts([long_prompt], max_chunks=1).hidden_states.shape[1] == 77
    # the second window changes the conditioning: the words after token 75 are seen
    shorter = " ".join(["cat"] * 75 + ["dog"] * 25)
    first = encoder.encode_prompts([long_prompt], max_chunks=2).hidden_states
    second = encoder.encode_prompts([shorter], max_chunks=2).hidden_states
    assert torch.allclose(first[:, :76], second[:, :76]) and not torch.allclose(first[:, 76:], second[:, 76:])


def test_sdxl_size_conditioning_rows_follow_each_side_of_guidance(sdxl):
    _, encoder = sdxl
    job = _job(size=SizeConditioning((1024, 768), (16, 8), (64, 64)), negative_size=SizeConditioning((512, 512)))
    conds = encode_guidance_conds(encoder, [job], guided=True, sdxl_size_ids=True, settings=SETTINGS)
    assert conds.added_cond_kwargs["time_ids"].tolist() == [[512, 512, 0, 0, 64, 64], [1024, 768, 16, 8, 64, 64]]
    default = encode_guidance_conds(encoder, [_job()], guided=False, sdxl_size_ids=True, settings=SETTINGS)
    assert default.added_cond_kwargs["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


def test_sdxl_batch_renders_with_negative_size_conditioning(sdxl):
    images = _render(sdxl, [_job(steps=2, negative_size=SizeConditioning((32, 32))), _job(steps=2, seed=5)])
    assert len(images) == 2 and images[0].shape == (64, 64, 3)


class _RowUNet:
    """A stand-in U-Net whose prediction for each batch row is that row's conditioning value."""

    def __call__(self, model_input, timestep, encoder_hidden_states, added_cond_kwargs=None):
        from types import SimpleNamespace

        return SimpleNamespace(sample=torch.zeros_like(model_input) + encoder_hidden_states.view(-1, 1, 1, 1))


class _IdentityScheduler:
    def scale_model_input(self, model_input, timestep):
        return model_input


def test_negative_scale_is_kohyas_three_part_formula():
    latents = torch.zeros(1, 4, 2, 2)
    negative, positive, unconditional = 2.0, 5.0, 1.0
    conds = GuidanceConds(torch.tensor([negative, positive, unconditional]).view(3, 1, 1), True, None, 0.5)
    prediction = guided_prediction(_RowUNet(), _IdentityScheduler(), latents, torch.tensor(1), conds, 7.0,
                                   torch.float32)
    expected = unconditional + 7.0 * (positive - unconditional) - 0.5 * (negative - unconditional)
    assert torch.equal(prediction, torch.full_like(latents, expected))
    plain = GuidanceConds(torch.tensor([negative, positive]).view(2, 1, 1), True)
    plain_prediction = guided_prediction(_RowUNet(), _IdentityScheduler(), latents, torch.tensor(1), plain, 7.0,
                                         torch.float32)
    assert torch.equal(plain_prediction, torch.full_like(latents, negative + 7.0 * (positive - negative)))


def test_negative_scale_sends_negative_prompt_and_empty_prompt_rows(sd1, sdxl):
    bundle, encoder = sd1
    sizes = []
    hook = bundle.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        _render(sd1, [_job(steps=1, negative_scale=2.0), _job(steps=1, seed=2, negative_scale=2.0)])
        _render(sd1, [_job(steps=1)])
    finally:
        hook.remove()
    assert sizes == [6, 2]  # two images × (negative, prompt, empty prompt); then negative + prompt
    conds = encode_guidance_conds(encoder, [_job(negative_scale=2.0)], guided=True, sdxl_size_ids=False,
                                  settings=SETTINGS)
    empty = encoder.encode_prompts([""], max_chunks=3).hidden_states
    assert conds.parts == 3 and torch.allclose(conds.hidden_states[2:], empty, atol=1e-5)
    _, xl_encoder = sdxl
    job = _job(negative_scale=1.0, size=SizeConditioning((1024, 768)), negative_size=SizeConditioning((512, 512)))
    xl = encode_guidance_conds(xl_encoder, [job], guided=True, sdxl_size_ids=True, settings=SETTINGS)
    assert xl.added_cond_kwargs["time_ids"].tolist() == [[512, 512, 0, 0, 64, 64], [1024, 768, 0, 0, 64, 64],
                                                         [512, 512, 0, 0, 64, 64]]
    assert xl.added_cond_kwargs["text_embeds"].shape[0] == 3
