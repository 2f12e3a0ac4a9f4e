"""Generator flags (gen_img.py / sdxl_gen_img.py on the tiny models) observed on what they change: the SDXL size
ids the U-Net receives and the PNG text that records them, the img2img strength of the highres fix's second stage,
the order of the prompts, the U-Net's memory format, the VAE's tiling, the metadata a network file shows. A few
shared runs carry several flags whose effects do not interfere."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import gen_img
import sdxl_gen_img
from tests.cli_helpers import captured_logs, run_error
from tests.scripts.test_gen_img import generate, make_lora_file, pixels

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a white star"]
SHUFFLE_SEED = 5
SHOWN_COMMENT = "shown by --network_show_meta"


@dataclass
class Generated:
    paths: list[Path]
    session: object = None
    logs: list = field(default_factory=list)
    job_strengths: list = field(default_factory=list)  # strength of each job rendered, in order
    time_ids: list = field(default_factory=list)  # SDXL size ids of each U-Net batch (rows: negatives, positives)

    def text(self, index: int = -1) -> dict:
        with Image.open(self.paths[index]) as image:
            return dict(image.text)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.logs]


def generate_recorded(model: Path, outdir: Path, *extra: str, script=gen_img) -> Generated:
    """Run the generator, recording the session it loaded, the jobs and SDXL size ids it rendered, and the log."""
    import library.generation.run as run
    import library.sampling.pipeline as pipeline

    result = Generated([])
    load_session, render_jobs, encode_conds = run.load_session, run._generate, pipeline.encode_guidance_conds

    def recording_load_session(*args, **kwargs):
        result.session = load_session(*args, **kwargs)
        return result.session

    def recording_generate(session, jobs):
        result.job_strengths.extend(job.strength for job in jobs)
        return render_jobs(session, jobs)

    def recording_encode(*args, **kwargs):
        conds = encode_conds(*args, **kwargs)
        if conds.added_cond_kwargs is not None:
            result.time_ids.append(conds.added_cond_kwargs["time_ids"].tolist())
        return conds

    with pytest.MonkeyPatch.context() as monkeypatch, captured_logs() as records:
        monkeypatch.setattr(run, "load_session", recording_load_session)
        monkeypatch.setattr(run, "_generate", recording_generate)
        monkeypatch.setattr(pipeline, "encode_guidance_conds", recording_encode)
        result.paths = generate(model, outdir, *extra, script=script)
    result.logs = records
    return result


# ---------------------------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="module")
def lora_with_metadata(tiny_models, tmp_path_factory) -> Path:
    path = make_lora_file(tiny_models, "sd1", tmp_path_factory.mktemp("lora") / "shown.safetensors")
    save_file(load_file(path), str(path), metadata={"ss_training_comment": SHOWN_COMMENT, "ss_network_dim": "4"})
    return path


@pytest.fixture(scope="module")
def shuffled(tiny_models, lora_with_metadata, tmp_path_factory) -> Generated:
    """SD1: four prompts from a file, shuffled with a seed, in one batch; channels-last U-Net, VAE tiling on, a
    LoRA whose metadata is shown."""
    root = tmp_path_factory.mktemp("shuffled")
    prompts = root / "prompts.txt"
    prompts.write_text("".join(f"{prompt}\n" for prompt in PROMPTS))
    return generate_recorded(tiny_models.path("sd1"), root / "out", "--from_file", str(prompts), "--shuffle_prompts",
                             "--seed", str(SHUFFLE_SEED), "--batch_size", "4", "--opt_channels_last",
                             "--vae_tiling", "--network_weights", str(lora_with_metadata), "--network_show_meta")


def highres(tiny_models, root: Path, strength: str, *extra: str) -> Generated:
    return generate_recorded(tiny_models.path("sd1"), root / f"out-{strength}", "--prompt", "a cat --d 7",
                             "--W", "128", "--H", "128", "--highres_fix_scale", "0.5", "--highres_fix_steps", "1",
                             "--highres_fix_strength", strength, *extra)


@pytest.fixture(scope="module")
def highres_runs(tiny_models, tmp_path_factory) -> tuple[Generated, Generated]:
    """SD1 highres fix to 128x128 at second-stage strengths 0.3 and 0.9; the first with --vae_slices."""
    root = tmp_path_factory.mktemp("highres")
    return highres(tiny_models, root, "0.3", "--vae_slices", "4"), highres(tiny_models, root, "0.9")


@pytest.fixture(scope="module")
def sdxl_sized(tiny_models, tmp_path_factory) -> Generated:
    return generate_recorded(tiny_models.path("sdxl"), tmp_path_factory.mktemp("sdxl") / "out", "--prompt",
                             "a cat --n blurry --d 5", "--original_width", "1024", "--original_height", "768",
                             "--original_height_negative", "512", "--crop_top", "16", "--crop_left", "8",
                             "--target_width", "960", "--target_height", "640", script=sdxl_gen_img)


# ---------------------------------------------------------------------------------------------- SDXL sizes

def test_sdxl_size_flags_reach_the_unet_and_are_recorded_in_the_png(sdxl_sized):
    assert len(sdxl_sized.paths) == 1
    # SDXL time ids: original (h, w), crop (top, left), target (h, w); the negative side's original height is
    # its own flag, everything else defaults to the positive side's (kohya)
    assert sdxl_sized.time_ids == [[[512, 1024, 16, 8, 640, 960], [768, 1024, 16, 8, 640, 960]]]
    text = sdxl_sized.text()
    assert (text["original-width"], text["original-height"], text["crop-top"], text["crop-left"],
            text["target-width"], text["target-height"]) == ("1024", "768", "16", "8", "960", "640")
    assert (text["original-width-negative"], text["original-height-negative"]) == ("1024", "512")
    assert pixels(sdxl_sized.paths[0]).shape == (64, 64, 3)  # the image itself stays at --W/--H


# ---------------------------------------------------------------------------------------------- highres fix

def test_highres_fix_strength_is_the_second_stage_img2img_strength(highres_runs):
    weak, strong = highres_runs
    for run, strength in ((weak, 0.3), (strong, 0.9)):
        assert run.job_strengths == [None, strength]  # text-to-image first stage, then img2img at the flag's value
        assert float(run.text()["highres-fix-strength"]) == strength
        assert pixels(run.paths[-1]).shape == (128, 128, 3)
    assert np.abs(pixels(weak.paths[-1]) - pixels(strong.paths[-1])).max() > 10


# ---------------------------------------------------------------------------------------------- prompts

def test_shuffle_prompts_renders_the_prompt_file_in_a_seeded_order(shuffled):
    order = list(range(len(PROMPTS)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    assert order != sorted(order)
    assert [shuffled.text(index)["prompt"] for index in range(len(shuffled.paths))] == [PROMPTS[i] for i in order]


# ---------------------------------------------------------------------------------------------- performance flags

def test_opt_channels_last_puts_the_unet_in_channels_last(shuffled, highres_runs):
    conv = shuffled.session.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert highres_runs[0].session.unet.conv_in.weight.is_contiguous()  # without the flag


def test_vae_tiling_and_vae_slices_turn_on_tiled_vae_decoding(shuffled, highres_runs):
    # diffusers decodes in tiles once an image is larger than the VAE's tile (512 pixels for this VAE's config;
    # the tiny images here are smaller, so only the switch and the written images are checked)
    sliced, plain = highres_runs
    assert shuffled.session.vae.use_tiling is True and len(shuffled.paths) == len(PROMPTS)
    assert sliced.session.vae.use_tiling is True and sliced.paths[-1].is_file()  # --vae_slices 4: any value > 0
    assert plain.session.vae.use_tiling is False


def test_network_show_meta_logs_the_network_files_metadata(shuffled, lora_with_metadata):
    shown = [message for message in shuffled.messages() if message.startswith("metadata of")]
    assert len(shown) == 1
    assert shown[0].startswith(f"metadata of {lora_with_metadata} (")
    assert f"\n  ss_training_comment: {SHOWN_COMMENT}" in shown[0] and "\n  ss_network_dim: 4" in shown[0]
    assert shuffled.text()["networks"] == f"{lora_with_metadata.name}:1.0"


def test_xformers_without_the_package_is_refused_before_the_model_loads(tiny_models, tmp_path, capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --xformers was refused")

    monkeypatch.setattr("library.models.load.load_target_model", no_loading)
    line = run_error(gen_img.main, ["--ckpt", str(tiny_models.path("sd1")), "--outdir", str(tmp_path), "--prompt",
                                    "a cat", "--xformers"], capsys)
    assert line.startswith("error: --xformers: xformers could not be imported") and line.endswith("; use --sdpa")
