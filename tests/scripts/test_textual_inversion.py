"""train_textual_inversion.py / sdxl_train_textual_inversion.py on tiny SD1, SD2-v and SDXL models: only the new
vectors change, the loss on the training data falls, captions/templates carry the token, multi-vector init,
--weights continuation, the saved keys and shapes, the files in diffusers and in our generators, exact resume, and
the bad inputs that fail before models load."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import sdxl_train_textual_inversion
import train_textual_inversion
from library.errors import FlagError
from library.text import textual_inversion as ti
from library.text.ti_templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
from tests.scripts.test_train_network import dataset_toml

TOKEN = "tkshape"  # the bundled captions start with it


def ti_argv(model: Path, toml: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml), "--output_dir", str(out),
            "--token_string", TOKEN, "--learning_rate", "5e-2", "--seed", "1", "--max_train_steps", "4",
            "--skip_dataset_lint", "--max_data_loader_n_workers", "0", "--optimizer_type", "AdamW", *extra]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def recording(sdxl: bool):
    base = train_textual_inversion.trainer_class(sdxl=sdxl)

    class Recording(base):
        def load_target_model(self, args, weight_dtype, accelerator):
            loaded = super().load_target_model(args, weight_dtype, accelerator)
            self.before = {"unet": snapshot(loaded[3]), "te": [snapshot(encoder) for encoder in loaded[1]]}
            self.captions: list[str] = []
            return loaded

        def make_network(self, run, models):
            network = super().make_network(run, models)
            self.initial = [block.detach().clone() for block in network.vectors]
            return network

        def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
            if is_train:
                self.captions.extend(batch["captions"])
            super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train)

    return Recording


def run(argv: list[str], sdxl: bool = False):
    from library.config_file import parse_args_with_config

    script = sdxl_train_textual_inversion if sdxl else train_textual_inversion
    args = parse_args_with_config(script.setup_parser(), argv)
    trainer = recording(sdxl)()
    return trainer, trainer.train(args)


def read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}
    return torch.load(path, weights_only=True)


def encoder_unchanged(before: dict, encoder, first_id: int) -> None:
    """Every tensor of the encoder is bit-identical, the token table up to the first new row."""
    after = encoder.state_dict()
    for key, value in before.items():
        got = after[key] if key in after else after[key.replace("token_embedding.weight",
                                                                "token_embedding.table.weight")]
        if key.endswith("token_embedding.weight"):
            assert torch.equal(got[:first_id], value[:first_id]), key
        else:
            assert torch.equal(got, value), key


@dataclass
class Trained:
    trainer: object
    final: Path
    sdxl: bool


FAMILIES = {"sd1": False, "sd2-v": False, "sdxl": True}
TIMESTEP = 500  # the fixture trains at this one timestep, where the loss is then measured


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tiny_models, tmp_path_factory) -> Trained:
    family = request.param
    root = tmp_path_factory.mktemp(f"ti-{family}")
    trainer, final = run(ti_argv(tiny_models.path(family), dataset_toml(root, batch_size=4), root / "out",
                                 "--init_word", "red circle", "--num_vectors_per_token", "3",
                                 "--max_train_steps", "24", "--save_model_as", "safetensors", "--cache_latents",
                                 "--min_timestep", str(TIMESTEP), "--max_timestep", str(TIMESTEP + 1),
                                 "--optimizer_args", "weight_decay=0.1"), sdxl=FAMILIES[family])
    return Trained(trainer, final, FAMILIES[family])


def test_only_the_new_vectors_change(trained):
    trainer = trained.trainer
    models = trainer._models
    assert all(torch.equal(value, models.unet.state_dict()[key]) for key, value in trainer.before["unet"].items())
    for slot, encoder in enumerate(models.text_encoders):
        encoder_unchanged(trainer.before["te"][slot], encoder, trainer._first_ids[slot])
    vectors = trainer._trainable.network.vectors
    assert all(not torch.equal(block, start) for block, start in zip(vectors, trainer.initial))
    # the optimizer holds state for the vectors only: O(vectors), not O(vocabulary)
    state_sizes = [value.numel() for state in trainer._trainable.optimizer.state.values()
                   for value in state.values() if torch.is_tensor(value) and value.dim() > 0]
    assert max(state_sizes) == max(block.numel() for block in vectors)


def training_objective(trainer, timestep: int = TIMESTEP, noises: int = 8) -> float:
    """The trainer's loss on every training image at the training timestep, with fixed noises (the same ones
    for every call), as its validation computes it."""
    from library.data.order import EpochOrderSampler, epoch_data_loader
    from library.train.step_hooks import NoisePlan
    from library.train.training_loop import _micro_batch_loss

    run_, models, trainable, group = trainer._run, trainer._models, trainer._trainable, trainer._run.train_group
    group.set_current_epoch(1)
    losses = []
    for index, batch in enumerate(epoch_data_loader(group, EpochOrderSampler(len(group), 0, 0, 1, shuffle=False),
                                                    0, False)):
        for seed in range(noises):
            trainer.noise_plan = NoisePlan(validation_timestep=timestep, validation_seed=100 * index + seed)
            with torch.no_grad():
                losses.append(float(_micro_batch_loss(trainer, run_, models, trainable, batch, is_train=False)))
    return sum(losses) / len(losses)


def test_the_loss_on_the_training_images_falls(trained):
    """The tiny random U-Nets listen little to their text: the trained vectors lower the loss by 0.06-0.4%
    (measured over seeds and families), so it is measured paired (the same noises for the start vectors and the
    trained ones) at the one timestep the fixture trains at."""
    trainer = trained.trainer
    vectors = trainer._trainable.network.vectors
    trained_vectors = [block.detach().clone() for block in vectors]
    losses = {}
    for name, blocks in (("start", trainer.initial), ("trained", trained_vectors)):
        with torch.no_grad():
            for parameter, block in zip(vectors, blocks):
                parameter.copy_(block)
        losses[name] = training_objective(trainer)
    assert losses["trained"] < losses["start"], losses


def test_saved_keys_shapes_and_metadata_per_family(trained):
    tensors = read_file(trained.final)
    widths = [encoder.get_input_embeddings().embedding_dim for encoder in trained.trainer._models.text_encoders]
    keys = list(ti.SDXL_KEYS) if trained.sdxl else [ti.SINGLE_ENCODER_KEY]
    assert sorted(tensors) == sorted(keys)
    assert [list(tensors[key].shape) for key in keys] == [[3, width] for width in widths]
    assert trained.final.name == f"{TOKEN}.safetensors"
    with safe_open(str(trained.final), "pt") as file:
        metadata = file.metadata()
    assert metadata["modelspec.architecture"].endswith("/textual-inversion")
    assert metadata["modelspec.title"] == TOKEN and not any(key.startswith("ss_") for key in metadata)
    vectors = trained.trainer._trainable.network.vectors
    assert all(torch.equal(tensors[key], block.detach()) for key, block in zip(keys, vectors))


def test_multi_token_init_word_spreads_over_the_vectors(trained):
    """'red circle' is 2 tokens for 3 vectors: vector i starts as token i mod 2 (kohya)."""
    trainer = trained.trainer
    for slot, (tokenizer, encoder) in enumerate(zip(trainer._models.tokenizers, trainer._models.text_encoders)):
        ids = tokenizer("red circle", add_special_tokens=False).input_ids
        table = encoder.get_input_embeddings().weight
        expected = torch.stack([table[ids[index % len(ids)]].float() for index in range(3)])
        assert torch.equal(trainer.initial[slot], expected)


def test_captions_name_every_vector(trained):
    words = f"{TOKEN} {TOKEN}1 {TOKEN}2"
    assert trained.trainer.captions and all(caption.startswith(words + ",") for caption in trained.trainer.captions)


# ------------------------------------------------------------------------------------------ consumers


def _diffusers_loader():
    from diffusers.loaders import TextualInversionLoaderMixin

    class Loader(TextualInversionLoaderMixin):
        hf_device_map = None
        components: dict = {}

    return Loader()


def _hidden_states(tokenizer, encoder, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids, output_hidden_states=True).hidden_states[-1]


def test_diffusers_loads_the_embedding_and_encodes_as_our_generator(trained, tiny_models):
    """diffusers' load_textual_inversion (SDXL: clip_l into TE1, clip_g into TE2, as diffusers documents) gives
    the same text-encoder outputs as our generator's loader with the same file."""
    import copy

    from library.models.load import detect_family, text_encoder_widths
    from library.text.tokenize import load_tokenizers

    family_name = {"sd1": "sd1", "sd2-v": "sd2-v", "sdxl": "sdxl"}
    path = trained.final
    model_path = Path(trained.trainer._run.args.pretrained_model_name_or_path)
    family = detect_family(model_path, v_parameterization=trained.trainer.family.v_parameterization)
    name = next(key for key in family_name if tiny_models.path(key) == model_path)
    bundle = copy.deepcopy(tiny_models.bundle(name))
    ours_encoders = copy.deepcopy(bundle.text_encoders)
    embedding = ti.load_embedding(path, family, text_encoder_widths(model_path, family))
    tokenizers = load_tokenizers(family)
    ours_tokenizers = ti.install_embeddings([embedding], tokenizers, ours_encoders)
    prompt = f"a photo of {TOKEN}"
    ours_prompt = ti.expand_embedding_tokens(prompt, [embedding])
    loader, tensors = _diffusers_loader(), read_file(path)
    for slot, (tokenizer, encoder) in enumerate(zip(tokenizers, bundle.text_encoders)):
        tokenizer = copy.deepcopy(tokenizer)
        source = str(path) if not trained.sdxl else tensors[ti.SDXL_KEYS[slot]]
        loader.load_textual_inversion(source, token=TOKEN, tokenizer=tokenizer, text_encoder=encoder)
        theirs = _hidden_states(tokenizer, encoder, loader.maybe_convert_prompt(prompt, tokenizer))
        ours = _hidden_states(ours_tokenizers[slot], ours_encoders[slot], ours_prompt)
        assert torch.allclose(theirs, ours, atol=1e-5), (slot, float((theirs - ours).abs().max()))


def test_our_generator_uses_the_embedding(trained, tmp_path):
    import gen_img
    import sdxl_gen_img

    model = trained.trainer._run.args.pretrained_model_name_or_path
    script = sdxl_gen_img if trained.sdxl else gen_img
    common = ["--ckpt", str(model), "--steps", "2", "--W", "64", "--H", "64", "--sampler", "euler_a", "--seed", "3",
              "--prompt", f"a photo of {TOKEN}"]
    with_embedding = script.main([*common, "--outdir", str(tmp_path / "with"),
                                  "--textual_inversion_embeddings", str(trained.final)])[0]
    without = script.main([*common, "--outdir", str(tmp_path / "without")])[0]
    from tests.scripts.test_gen_img import pixels

    assert (pixels(with_embedding) != pixels(without)).any()


# ------------------------------------------------------------------------------------------ modes and files


def test_object_templates_replace_the_captions(tiny_models, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="library.train.textual_inversion"):
        trainer, _ = run(ti_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                 "--use_object_template", "--use_style_template", "--num_vectors_per_token", "2",
                                 "--max_train_steps", "3"))
    assert "both given; training with the object templates" in caplog.text
    expected = {template.format(f"{TOKEN} {TOKEN}1") for template in OBJECT_TEMPLATES}
    assert len(trainer.captions) == 6 and set(trainer.captions) <= expected
    assert len(set(trainer.captions)) > 1, "a random template per image load"


def test_style_templates_and_a_pt_file_that_our_loader_reads(tiny_models, tmp_path):
    trainer, final = run(ti_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                 "--use_style_template", "--max_train_steps", "2", "--output_name", "style"))
    assert set(trainer.captions) <= {template.format(TOKEN) for template in STYLE_TEMPLATES}
    assert final.name == "style.pt"
    assert list(torch.load(final, weights_only=True)) == [ti.SINGLE_ENCODER_KEY]
    read = ti.read_embedding_file(final)
    assert torch.equal(read[ti.SINGLE_ENCODER_KEY], trainer._trainable.network.vectors[0].detach())


def test_template_counts_are_kohyas():
    assert (len(OBJECT_TEMPLATES), len(STYLE_TEMPLATES)) == (27, 19)
    assert len(set(STYLE_TEMPLATES)) == 17, "two style strings appear twice, as in kohya's list"
    assert all(template.count("{}") == 1 for template in OBJECT_TEMPLATES + STYLE_TEMPLATES)


def test_weights_continue_from_an_a1111_file_and_save_precision(tiny_models, tmp_path):
    width = tiny_models.bundle("sd1").text_encoders[0].get_input_embeddings().embedding_dim
    start = torch.randn(2, width)
    a1111 = tmp_path / "old.pt"
    torch.save({"string_to_param": {"*": start}, "name": "old", "step": 10}, a1111)
    trainer, final = run(ti_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                 "--weights", str(a1111), "--num_vectors_per_token", "2", "--max_train_steps", "1",
                                 "--save_precision", "fp16", "--save_model_as", "safetensors"))
    assert torch.equal(trainer.initial[0], start)
    assert read_file(final)[ti.SINGLE_ENCODER_KEY].dtype == torch.float16


def test_resumed_twice_equals_uninterrupted(tiny_models, tmp_path):
    model, toml = tiny_models.path("sdxl"), dataset_toml(tmp_path)
    common = ["--num_vectors_per_token", "2", "--max_train_steps", "6", "--save_every_n_steps", "2", "--save_state",
              "--init_word", "shape"]
    _, whole = run(ti_argv(model, toml, tmp_path / "whole", *common), sdxl=True)
    state = f"{TOKEN}-step00000002-state"
    shutil.copytree(tmp_path / "whole" / state, tmp_path / "resumed" / state)
    run(ti_argv(model, toml, tmp_path / "resumed", *common, "--resume", str(tmp_path / "resumed" / state)),
        sdxl=True)
    later = tmp_path / "resumed" / f"{TOKEN}-step00000004-state"
    _, final = run(ti_argv(model, toml, tmp_path / "resumed", *common, "--resume", str(later)), sdxl=True)
    expected, got = read_file(whole), read_file(final)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_sample_prompts_expand_the_token(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of {TOKEN} --n not {TOKEN}s --w 64 --h 64 --s 2\n", encoding="utf-8")
    trainer, _ = run(ti_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                             "--num_vectors_per_token", "2", "--max_train_steps", "1", "--sample_prompts",
                             str(prompts), "--sample_every_n_steps", "1"))
    prompt = trainer._run.sample_prompts[0]
    assert (prompt.prompt, prompt.negative_prompt) == (f"a photo of {TOKEN} {TOKEN}1", f"not {TOKEN}s")
    assert list((tmp_path / "out" / "sample").glob("*.png"))


# ------------------------------------------------------------------------------------------ bad input


def _lora_file(tiny_models, tmp_path) -> Path:
    from tests.scripts.test_gen_img import make_lora_file

    return make_lora_file(tiny_models, "sd1", tmp_path / "lora.safetensors")


@pytest.mark.parametrize(("family", "extra", "message"), [
    ("sd1", ["--token_string", "girl"], "'girl' is already a word of the tokenizer"),
    ("sdxl", ["--token_string", "my char"], "expected one word without spaces"),
    ("sd1", ["--init_word", "   "], "--init_word '   ': tokenizes to nothing"),
    ("sd1", ["--init_word", "\t\u3000"], "tokenizes to nothing"),
    ("sd1", ["--cache_text_encoder_outputs"], "its outputs change every step"),
    ("sd1", ["--token_string", "neverinacaption"], "no caption of the training images contains it"),
    ("sd1", ["--weights", "missing.pt"], "--weights missing.pt: file not found"),
    ("sd1", ["--weights", "LORA"], "is this a LoRA file?"),
    ("sd1", ["--weights", "TWO_VECTORS"], "has 2 vector(s), but --num_vectors_per_token is 1"),
    ("sd1", ["--weights", "WIDE"], "expected [n, 32]"),
    ("sdxl", ["--weights", "TWO_VECTORS"], "holds an SD1/SD2 embedding"),
])
def test_bad_input_fails_in_one_line_before_models_load(tiny_models, tmp_path, monkeypatch, family, extra, message):
    import library.models.load as load

    width = tiny_models.bundle("sd1").text_encoders[0].get_input_embeddings().embedding_dim
    files = {"LORA": lambda: _lora_file(tiny_models, tmp_path),
             "TWO_VECTORS": lambda: _saved(tmp_path / "two.pt", torch.randn(2, width)),
             "WIDE": lambda: _saved(tmp_path / "wide.pt", torch.randn(1, width * 2))}
    extra = [str(files[value]()) if value in files else value for value in extra]
    monkeypatch.setattr(load, "load_target_model", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ti_argv(tiny_models.path(family), dataset_toml(tmp_path), tmp_path / "out")
    if "--token_string" in extra:
        index = argv.index("--token_string")
        del argv[index:index + 2]
    with pytest.raises(FlagError) as raised:
        run([*argv, *extra], sdxl=family == "sdxl")
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def _saved(path: Path, tensor: torch.Tensor) -> Path:
    torch.save({"emb_params": tensor}, path)
    return path


def test_a_missing_token_string_is_named(tiny_models, tmp_path):
    argv = ti_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out")
    index = argv.index("--token_string")
    with pytest.raises(FlagError, match="--token_string is required"):
        run(argv[:index] + argv[index + 2:])


def test_full_bf16_trains_bf16_vectors_and_saves_them_in_bf16(tiny_models, tmp_path):
    trainer, final = run(ti_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                 "--mixed_precision", "bf16", "--full_bf16", "--max_train_steps", "2"))
    assert trainer._trainable.network.vectors[0].dtype == torch.bfloat16
    assert not torch.equal(trainer._trainable.network.vectors[0].float(), trainer.initial[0])
    assert read_file(final)[ti.SINGLE_ENCODER_KEY].dtype == torch.bfloat16  # no --save_precision: as trained
