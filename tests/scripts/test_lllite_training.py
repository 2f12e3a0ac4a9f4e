"""sdxl_train_control_net_lllite.py on the tiny SDXL: only LLLite trains (the U-Net bit-identical), the loss falls,
kohya's file (keys, modelspec only), sample images with a `--cn` conditioning image, the conditioning image aligned
with its image through bucketing, crop and flip, and the bad inputs that fail before models load."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sdxl_train_control_net_lllite
from library.errors import FlagError, UserInputError
from tests.scripts.test_textual_inversion import training_objective
from tests.scripts.test_train_network import DATASET

TIMESTEP = 500


def make_pairs(root: Path, sizes: dict[str, tuple[int, int]] | None = None) -> tuple[Path, Path]:
    """The bundled images (or generated ones of `sizes`) and conditioning images of the same names and sizes."""
    images, conditions = root / "images", root / "cond"
    images.mkdir(parents=True, exist_ok=True)
    conditions.mkdir(exist_ok=True)
    if sizes is None:
        for path in sorted(DATASET.glob("*")):
            shutil.copy(path, images / path.name)
            if path.suffix == ".png":  # the conditioning image: the image's inverted colours
                with Image.open(path) as image:
                    Image.fromarray(255 - np.asarray(image.convert("RGB"))).save(conditions / path.name)
    else:
        for stem, size in sizes.items():
            Image.new("RGB", size, (90, 120, 150)).save(images / f"{stem}.png")
            (images / f"{stem}.txt").write_text("tkshape, a test image", encoding="utf-8")
            Image.new("RGB", size, (0, 0, 0)).save(conditions / f"{stem}.png")
    return images, conditions


def pairs_toml(root: Path, images: Path, conditions: Path, extra: str = "", batch_size: int = 2) -> Path:
    toml = root / "lllite.toml"
    toml.write_text(f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = {batch_size}
{extra}
[[datasets.subsets]]
image_dir = '{images.as_posix()}'
conditioning_data_dir = '{conditions.as_posix()}'
""", encoding="utf-8")
    return toml


def lllite_argv(model: Path, toml: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml), "--output_dir", str(out),
            "--output_name", "lllite", "--cond_emb_dim", "8", "--network_dim", "8", "--learning_rate", "1e-2",
            "--seed", "1", "--max_train_steps", "2", "--skip_dataset_lint", "--max_data_loader_n_workers", "0",
            "--optimizer_type", "AdamW", *extra]


class Recording(sdxl_train_control_net_lllite.trainer_class()):
    def load_target_model(self, args, weight_dtype, accelerator):
        loaded = super().load_target_model(args, weight_dtype, accelerator)
        self.unet_before = {key: value.detach().clone() for key, value in loaded[3].state_dict().items()}
        self.batches: list[dict] = []
        return loaded

    def make_network(self, run, models):
        network = super().make_network(run, models)
        self.initial = {key: value.detach().clone() for key, value in network.state_dict().items()}
        return network

    def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
        if is_train:
            self.batches.append({key: batch[key] for key in ("images", "conditioning_images", "flippeds")})
        super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train)


def run(argv: list[str]):
    from library.config_file import parse_args_with_config

    args = parse_args_with_config(sdxl_train_control_net_lllite.setup_parser(), argv)
    trainer = Recording()
    return trainer, trainer.train(args)


@dataclass
class Trained:
    trainer: Recording
    final: Path
    out: Path


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("lllite")
    images, conditions = make_pairs(root)
    prompts = root / "prompts.txt"
    prompts.write_text(f"a red circle --w 64 --h 64 --s 2 --d 5 --cn {conditions / '00_red_circle.png'}\n"
                       "a red circle --w 64 --h 64 --s 2 --d 5\n", encoding="utf-8")
    out = root / "out"
    trainer, final = run(lllite_argv(tiny_models.path("sdxl"), pairs_toml(root, images, conditions), out,
                                     "--max_train_steps", "16", "--min_timestep", str(TIMESTEP), "--max_timestep",
                                     str(TIMESTEP + 1), "--sample_prompts", str(prompts), "--sample_every_n_steps",
                                     "16", "--save_model_as", "safetensors"))
    return Trained(trainer, final, out)


def test_only_the_lllite_modules_change(trained):
    trainer = trained.trainer
    after = trainer._models.unet.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in trainer.unet_before.items())
    now = trainer._trainable.network.state_dict()
    assert all(not torch.equal(value, now[key]) for key, value in trainer.initial.items()
               if key.endswith("up.0.weight"))


def test_the_loss_on_the_training_pairs_falls(trained):
    trainer = trained.trainer
    network = trainer._trainable.network
    trained_state = {key: value.detach().clone() for key, value in network.state_dict().items()}
    losses = {}
    for name, state in (("start", trainer.initial), ("trained", trained_state)):
        network.load_state_dict(state)
        losses[name] = training_objective(trainer, timestep=TIMESTEP)
    assert losses["trained"] < losses["start"], losses


def test_the_file_is_kohyas(trained):
    with safe_open(str(trained.final), "pt") as file:
        keys, metadata = list(file.keys()), file.metadata()
    modules = {key.split(".", 1)[0] for key in keys}
    assert len(modules) == len(trained.trainer._trainable.network.unet_modules) == 40  # the tiny U-Net's layers
    assert all(key.startswith("lllite_unet_") for key in keys)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"
    assert metadata["modelspec.title"] == "lllite" and not any(key.startswith("ss_") for key in metadata)


def test_sample_images_use_the_prompts_conditioning_image(trained):
    samples = sorted((trained.out / "sample").glob("*.png"))
    assert len(samples) == 2
    with_cn, without = (np.asarray(Image.open(path)).astype(int) for path in samples)
    assert (with_cn != without).any(), "the same prompt and seed: only --cn differs"


def test_conditioning_images_stay_aligned_through_crop_and_flip(tiny_models, tmp_path):
    """A marked square at the same spot of a wide image and its conditioning image ends at the same spot of the
    cropped 64x64 bucket, flipped or not."""
    images, conditions = make_pairs(tmp_path, {f"wide{index}": (96, 64) for index in range(8)})
    for index in range(8):
        for folder, colour in ((images, (255, 255, 255)), (conditions, (255, 255, 255))):
            path = folder / f"wide{index}.png"
            with Image.open(path) as opened:
                image = opened.convert("RGB")
            image.paste(colour, (30 + 4 * index, 20, 34 + 4 * index, 24))
            image.save(path)
    toml = pairs_toml(tmp_path, images, conditions, extra="flip_aug = true", batch_size=1)
    trainer, _ = run(lllite_argv(tiny_models.path("sdxl"), toml, tmp_path / "out", "--max_train_steps", "8"))
    flips = []
    for batch in trainer.batches:
        image, cond = batch["images"][0], batch["conditioning_images"][0]
        assert image.shape == cond.shape == (3, 64, 64)
        image_mark, cond_mark = (tensor.mean(0) > 0.9 for tensor in (image, cond))
        assert image_mark.any() and torch.equal(image_mark, cond_mark)
        flips.append(batch["flippeds"][0])
    assert len(set(flips)) == 2, "both orientations were seen"


# ------------------------------------------------------------------------------------------ bad input


def _fail_before_models(monkeypatch):
    import library.models.load as load

    monkeypatch.setattr(load, "load_target_model", lambda *a, **k: pytest.fail("a model was loaded"))


def test_a_differently_sized_conditioning_image_names_both_files(tiny_models, tmp_path, monkeypatch):
    images, conditions = make_pairs(tmp_path, {"a": (64, 64), "b": (64, 64)})
    Image.new("RGB", (32, 64)).save(conditions / "b.png")
    _fail_before_models(monkeypatch)
    with pytest.raises(UserInputError) as raised:
        run(lllite_argv(tiny_models.path("sdxl"), pairs_toml(tmp_path, images, conditions), tmp_path / "out"))
    assert f"{images / 'b.png'} is 64x64 but {conditions / 'b.png'} is 32x64" in str(raised.value)


def test_a_missing_conditioning_image_is_named(tiny_models, tmp_path, monkeypatch):
    images, conditions = make_pairs(tmp_path, {"a": (64, 64), "b": (64, 64)})
    (conditions / "b.png").unlink()
    _fail_before_models(monkeypatch)
    with pytest.raises(UserInputError, match="has no image for 1 training image.*b.png"):
        run(lllite_argv(tiny_models.path("sdxl"), pairs_toml(tmp_path, images, conditions), tmp_path / "out"))


@pytest.mark.parametrize(("extra", "message"), [
    (["--cond_emb_dim", "7"], "--cond_emb_dim 7: expected an even width"),
    (["--masked_loss"], "--masked_loss cannot be used with ControlNet-LLLite"),
    (["--network_weights", "LORA"], "not a ControlNet-LLLite file (a LoRA file)"),
    (["--network_dropout", "1.5"], "--network_dropout 1.5: expected a probability"),
    (["--sample_prompts", "PROMPTS"], "--cn missing.png: file not found"),
])
def test_bad_flags_fail_in_one_line_before_models_load(tiny_models, tmp_path, monkeypatch, extra, message):
    from safetensors.torch import save_file

    images, conditions = make_pairs(tmp_path, {"a": (64, 64)})
    lora, prompts = tmp_path / "lora.safetensors", tmp_path / "prompts.txt"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    prompts.write_text("a cat --cn missing.png\n", encoding="utf-8")
    extra = [{"LORA": str(lora), "PROMPTS": str(prompts)}.get(value, value) for value in extra]
    _fail_before_models(monkeypatch)
    with pytest.raises(FlagError) as raised:
        run(lllite_argv(tiny_models.path("sdxl"), pairs_toml(tmp_path, images, conditions), tmp_path / "out",
                        *extra))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_an_sd1_model_and_a_dreambooth_dataset_are_refused(tiny_models, tmp_path, monkeypatch):
    from library.errors import UserInputError as AnyUserError
    from tests.scripts.test_train_network import dataset_toml

    images, conditions = make_pairs(tmp_path, {"a": (64, 64)})
    _fail_before_models(monkeypatch)
    with pytest.raises(AnyUserError, match="SD"):
        run(lllite_argv(tiny_models.path("sd1"), pairs_toml(tmp_path, images, conditions), tmp_path / "out"))
    with pytest.raises(AnyUserError, match="ControlNet-LLLite trains on ControlNet datasets"):
        run(lllite_argv(tiny_models.path("sdxl"), dataset_toml(tmp_path / "db"), tmp_path / "out2"))


def test_a_resumed_run_equals_the_uninterrupted_one(tiny_models, tmp_path):
    images, conditions = make_pairs(tmp_path)
    toml = pairs_toml(tmp_path, images, conditions)
    common = ["--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state"]
    _, whole = run(lllite_argv(tiny_models.path("sdxl"), toml, tmp_path / "whole", *common))
    state = "lllite-step00000002-state"
    shutil.copytree(tmp_path / "whole" / state, tmp_path / "resumed" / state)
    _, final = run(lllite_argv(tiny_models.path("sdxl"), toml, tmp_path / "resumed", *common, "--resume",
                               str(tmp_path / "resumed" / state)))
    with safe_open(str(whole), "pt") as expected, safe_open(str(final), "pt") as got:
        assert all(torch.equal(expected.get_tensor(key), got.get_tensor(key)) for key in expected.keys())


def test_gradient_checkpointing_with_full_bf16_trains(tiny_models, tmp_path):
    """The conditioning embedding is computed before the U-Net runs, so checkpointed blocks recompute the same
    graph (computing it inside the first block fails torch's checkpoint check)."""
    images, conditions = make_pairs(tmp_path)
    trainer, _ = run(lllite_argv(tiny_models.path("sdxl"), pairs_toml(tmp_path, images, conditions),
                                 tmp_path / "out", "--gradient_checkpointing", "--mixed_precision", "bf16",
                                 "--full_bf16"))
    network = trainer._trainable.network
    assert {parameter.dtype for parameter in network.parameters()} == {torch.bfloat16}
    changed = network.state_dict()
    assert any(not torch.equal(value.float(), changed[key].float()) for key, value in trainer.initial.items())
