"""Bad cache input through a tool's command line: one clear line naming the image, exit code 2, nothing written."""
from __future__ import annotations

import logging

import pytest
import torch

from library.models import load
from tests.cache_fixtures import SIZES, make_dreambooth_dir, npz_names
from tests.cli_helpers import run_error
from tests.library.test_caching import OverflowingVae
from tools import cache_latents


@pytest.fixture
def keep_root_log_level():
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


@pytest.mark.parametrize("precision_flags, hint", [
    (["--mixed_precision", "fp16"],
     "the VAE runs in float16, which overflows on some images; pass --no_half_vae to encode in float32"),
    (["--mixed_precision", "fp16", "--no_half_vae"],
     "the VAE runs in float32, so its weights are probably damaged; check the VAE or model file"),
])
def test_cache_latents_tool_refuses_nan_latents_in_one_line(tmp_path, tiny_models, capsys, monkeypatch,
                                                            keep_root_log_level, precision_flags, hint):
    image_dir = make_dreambooth_dir(tmp_path, {"square": SIZES["square"]})
    real_load_vae = load.load_vae

    def overflowing_load_vae(path, family, dtype=None):
        # the tiny VAE stays float32 on CPU; the wrapper reports the dtype the flags asked for
        return OverflowingVae(real_load_vae(path, family, dtype=torch.float32), dtype)

    monkeypatch.setattr(load, "load_vae", overflowing_load_vae)
    argv = ["--pretrained_model_name_or_path", str(tiny_models.path("sdxl")), "--train_data_dir", str(tmp_path),
            "--resolution", "64", *precision_flags]
    line = run_error(cache_latents.main, argv, capsys)
    assert line == (f"error: {image_dir / 'square.png'}: the VAE encoded this image to NaN/inf latents; {hint} "
                    "(no cache was written for it)")
    assert npz_names(image_dir) == []
