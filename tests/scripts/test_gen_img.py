"""gen_img.py / sdxl_gen_img.py end to end on tiny models: seeds, networks (dynamic, merged, multiplier 0, --am,
LyCORIS), embeddings, prompt files, PNG metadata round trip, img2img, highres fix, never overwriting, bad input."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import gen_img
import sdxl_gen_img
from tests.cli_helpers import run_error

FAST = ["--steps", "2", "--W", "64", "--H", "64", "--sampler", "euler_a", "--scale", "5"]


def generate(model: Path, outdir: Path, *extra: str, script=gen_img) -> list[Path]:
    return script.main(["--ckpt", str(model), "--outdir", str(outdir), *FAST, *extra])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)



def make_lora_file(tiny_models, family: str, path: Path, seed: int = 1, module: str = "networks.lora",
                   **network_args) -> Path:
    """A LoRA (or LyCORIS network) for a tiny model with random non-zero weights, saved to `path`."""
    import copy

    from library.train.network_module import create_network, import_network_module

    bundle = copy.deepcopy(tiny_models.bundle(family))
    network = create_network(import_network_module(module), multiplier=1.0, network_dim=4, network_alpha=2.0,
                             vae=bundle.vae, text_encoders=bundle.text_encoders, unet=bundle.unet,
                             kwargs=dict(network_args), output_dir=path.parent)
    network.apply_to(bundle.text_encoders[0] if len(bundle.text_encoders) == 1 else bundle.text_encoders,
                     bundle.unet, True, True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    network.save_weights(str(path), None, {})
    return path


@pytest.fixture(scope="module")
def sd1_model(tiny_models):
    return tiny_models.path("sd1")


@pytest.fixture(scope="module")
def sd1_lora(tiny_models, tmp_path_factory):
    return make_lora_file(tiny_models, "sd1", tmp_path_factory.mktemp("lora") / "style_a.safetensors")


def test_same_seed_same_image_and_png_names_and_metadata(sd1_model, tmp_path):
    first = generate(sd1_model, tmp_path / "a", "--prompt", "a red circle --n blurry", "--seed", "42")
    second = generate(sd1_model, tmp_path / "b", "--prompt", "a red circle --n blurry", "--seed", "42")
    other = generate(sd1_model, tmp_path / "c", "--prompt", "a red circle --n blurry", "--seed", "43")
    assert len(first) == 1 and first[0].parent == tmp_path / "a"
    assert first[0].name.startswith("im_") and first[0].name.endswith("_000_42.png")
    assert np.array_equal(pixels(first[0]), pixels(second[0]))
    assert np.abs(pixels(first[0]) - pixels(other[0])).max() > 0
    with Image.open(first[0]) as image:
        text = dict(image.text)
    assert text["prompt"] == "a red circle" and text["negative-prompt"] == "blurry" and text["seed"] == "42"
    assert text["steps"] == "2" and text["sampler"] == "euler_a" and float(text["scale"]) == 5.0
    assert text["model"] == sd1_model.name


def test_images_per_prompt_batches_and_iterations_follow_kohyas_seed_rules(sd1_model, tmp_path):
    import random

    paths = generate(sd1_model, tmp_path, "--prompt", "a red circle", "--seed", "5", "--images_per_prompt", "3",
                     "--batch_size", "2", "--n_iter", "2")
    assert len(paths) == 6
    source = random.Random(5)
    expected = [source.randint(0, 0x7FFFFFFF) for _ in range(6)]
    assert [int(path.stem.rsplit("_", 1)[1]) for path in paths] == expected
    # kohya: --iter_same_seed applies when no --seed is given
    same = generate(sd1_model, tmp_path / "same", "--prompt", "a red circle", "--n_iter", "2",
                    "--images_per_prompt", "2", "--iter_same_seed")
    seeds = [int(path.stem.rsplit("_", 1)[1]) for path in same]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and seeds[0] != seeds[2]


def test_lora_multiplier_zero_equals_no_lora_and_one_changes_the_image(sd1_model, sd1_lora, tmp_path):
    base = generate(sd1_model, tmp_path / "base", "--prompt", "a cat --d 3")[0]
    zero = generate(sd1_model, tmp_path / "zero", "--prompt", "a cat --d 3", "--network_weights", str(sd1_lora),
                    "--network_mul", "0")[0]
    one = generate(sd1_model, tmp_path / "one", "--prompt", "a cat --d 3", "--network_weights", str(sd1_lora))[0]
    assert np.array_equal(pixels(base), pixels(zero))
    assert np.abs(pixels(base) - pixels(one)).max() > 10
    with Image.open(one) as image:
        assert image.text["networks"] == f"{sd1_lora.name}:1.0"


def test_dynamic_lora_equals_merged_lora(sd1_model, sd1_lora, tmp_path):
    argv = ["--prompt", "a cat --d 3", "--network_weights", str(sd1_lora), "--network_mul", "0.7"]
    dynamic = generate(sd1_model, tmp_path / "dynamic", *argv)[0]
    merged = generate(sd1_model, tmp_path / "merged", *argv, "--network_merge")[0]
    assert np.abs(pixels(dynamic) - pixels(merged)).max() <= 2


def test_dynamic_and_merged_layers_agree_in_float64(tiny_models, sd1_lora):
    import copy

    from library.generation.networks import load_networks, network_specs

    specs = network_specs(None, [str(sd1_lora)], [0.7], None)
    results = []
    for merge in (False, True):
        bundle = copy.deepcopy(tiny_models.bundle("sd1")).to(dtype=torch.float64)
        load_networks(specs, family=bundle.family, text_encoders=bundle.text_encoders, vae=bundle.vae,
                      unet=bundle.unet, merge=merge, device=torch.device("cpu"), dtype=torch.float64)
        layer = bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        x = torch.randn(3, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        results.append(layer(x))
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-10)


def test_per_prompt_multipliers_with_two_networks(sd1_model, sd1_lora, tiny_models, tmp_path):
    second = make_lora_file(tiny_models, "sd1", tmp_path / "style_b.safetensors", seed=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --d 3 --am 0,0\n# a comment\n\na cat --d 3 --am 1,0.5\n", encoding="utf-8")
    paths = generate(sd1_model, tmp_path / "out", "--from_file", str(prompts), "--network_weights", str(sd1_lora),
                     str(second), "--network_mul", "1", "1")
    base = generate(sd1_model, tmp_path / "base", "--prompt", "a cat --d 3")[0]
    assert len(paths) == 2
    assert np.array_equal(pixels(paths[0]), pixels(base))
    assert np.abs(pixels(paths[1]) - pixels(base)).max() > 10
    with Image.open(paths[1]) as image:
        assert image.text["networks"] == f"{sd1_lora.name}:1.0,{second.name}:0.5"


def test_lycoris_network_file_is_applied(tiny_models, sd1_model, tmp_path):
    pytest.importorskip("lycoris")
    lycoris_file = make_lora_file(tiny_models, "sd1", tmp_path / "loha.safetensors", module="lycoris.kohya",
                                  algo="loha")
    base = generate(sd1_model, tmp_path / "base", "--prompt", "a cat --d 3")[0]
    styled = generate(sd1_model, tmp_path / "styled", "--prompt", "a cat --d 3", "--network_module", "lycoris.kohya",
                      "--network_weights", str(lycoris_file))[0]
    assert np.abs(pixels(base) - pixels(styled)).max() > 10


def test_png_metadata_regenerates_the_same_image(sd1_model, sd1_lora, tmp_path):
    made = generate(sd1_model, tmp_path / "first", "--prompt", "a (red:1.3) circle --n blurry --w 72 --h 64",
                    "--seed", "11", "--network_weights", str(sd1_lora), "--network_mul", "0.5",
                    "--sampler", "dpmsolver++", "--scale", "6.5", "--steps", "3", "--guidance_rescale", "0.3")[0]
    again = gen_img.main(["--ckpt", str(sd1_model), "--outdir", str(tmp_path / "again"), "--from_png", str(made),
                          "--network_weights", str(sd1_lora), "--network_mul", "0.5"])[0]
    assert np.array_equal(pixels(made), pixels(again))
    assert pixels(again).shape == (64, 72, 3)


def test_img2img_strength_zero_returns_the_input_and_original_file_names(sd1_model, tmp_path):
    source = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    paths = generate(sd1_model, tmp_path / "out", "--prompt", "a cat", "--image_path", str(source), "--strength", "0",
                     "--use_original_file_name")
    assert paths[0].name.startswith("photo")
    assert np.array_equal(pixels(paths[0]), pixels(source))
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    inpainted = generate(sd1_model, tmp_path / "inpaint", "--prompt", "a cat", "--image_path", str(source),
                         "--mask_path", str(mask), "--strength", "0.7")
    assert pixels(inpainted[0]).shape == (64, 64, 3)


def test_existing_images_are_never_overwritten(sd1_model, tmp_path):
    outdir = tmp_path / "out"
    first = generate(sd1_model, outdir, "--prompt", "a cat --d 1 --f cat", "--sequential_file_name")
    before = first[0].read_bytes()
    second = generate(sd1_model, outdir, "--prompt", "a dog --d 2 --f cat")
    sequential = generate(sd1_model, outdir, "--prompt", "a cat --d 1", "--sequential_file_name")
    assert first[0].read_bytes() == before
    assert second[0] != first[0] and second[0].exists()
    assert sequential[0].name == "im_000001.png"
    again = generate(sd1_model, outdir, "--prompt", "a cat --d 1", "--sequential_file_name")
    assert again[0].name == "im_000002.png"


def test_textual_inversion_embedding_changes_the_image(sd1_model, tiny_models, tmp_path):
    width = tiny_models.bundle("sd1").text_encoders[0].config.hidden_size
    embedding = tmp_path / "mystyle.safetensors"
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(0))}, str(embedding))
    plain = generate(sd1_model, tmp_path / "plain", "--prompt", "a cat in mystyle --d 4")[0]
    styled = generate(sd1_model, tmp_path / "styled", "--prompt", "a cat in mystyle --d 4",
                      "--textual_inversion_embeddings", str(embedding))[0]
    assert np.abs(pixels(plain) - pixels(styled)).max() > 10
    with Image.open(styled) as image:
        assert image.text["prompt"] == "a cat in mystyle"


def test_sdxl_generator_with_size_conditioning_highres_fix_and_long_prompts(tiny_models, tmp_path):
    model = tiny_models.path("sdxl")
    long_prompt = " ".join(["cat"] * 90)
    paths = generate(model, tmp_path / "out", "--prompt", f"{long_prompt} --ow 2048 --oh 1024 --ct 8 --cl 4",
                     "--max_embeddings_multiples", "2", "--original_width_negative", "512", "--batch_size", "2",
                     "--images_per_prompt", "2", "--highres_fix_scale", "0.5", "--highres_fix_steps", "2",
                     "--highres_fix_save_1st", "--seed", "1", "--W", "128", "--H", "128", script=sdxl_gen_img)
    assert len(paths) == 4
    first_stage = [path for path in paths if "hr_" not in path.name]
    final = [path for path in paths if "hr_" in path.name]
    assert len(first_stage) == len(final) == 2
    assert pixels(first_stage[0]).shape == (64, 64, 3)  # rendered at half size first
    assert pixels(final[0]).shape == (128, 128, 3)
    with Image.open(final[0]) as image:
        text = dict(image.text)
    assert (text["original-width"], text["original-height"], text["crop-top"], text["crop-left"]) == \
        ("2048", "1024", "8", "4")
    assert text["original-width-negative"] == "512"


def _guided_prediction_before_negative_scale(unet, scheduler, latents, timestep, conds, guidance_scale, dtype,
                                             guidance_rescale=0.0):
    """The pipeline's guidance step as it was before --nl existed, to prove the default path unchanged."""
    from library.sampling.pipeline import rescale_guidance

    model_input = torch.cat([latents, latents]) if conds.guided else latents
    model_input = scheduler.scale_model_input(model_input, timestep)
    prediction = unet(model_input.to(dtype), timestep, encoder_hidden_states=conds.hidden_states,
                      added_cond_kwargs=conds.added_cond_kwargs).sample.float()
    if not conds.guided:
        return prediction
    negative, positive = prediction.chunk(2)
    return rescale_guidance(negative + guidance_scale * (positive - negative), positive, guidance_rescale)


def test_without_negative_scale_images_are_bit_identical_to_plain_guidance(sd1_model, tmp_path, monkeypatch):
    now = generate(sd1_model, tmp_path / "now", "--prompt", "a cat --n blurry --d 3", "--guidance_rescale", "0.5")[0]
    monkeypatch.setattr("library.sampling.pipeline.guided_prediction", _guided_prediction_before_negative_scale)
    before = generate(sd1_model, tmp_path / "before", "--prompt", "a cat --n blurry --d 3",
                      "--guidance_rescale", "0.5")[0]
    assert np.array_equal(pixels(now), pixels(before))
    with Image.open(now) as image:
        assert "negative-scale" not in image.text


def test_negative_scale_guides_from_the_empty_prompt_and_regenerates_from_the_png(sd1_model, tmp_path):
    def make(name: str, prompt: str, *extra: str) -> Path:
        return generate(sd1_model, tmp_path / name, "--prompt", prompt, *extra)[0]

    plain = make("plain", "a cat --n blurry --d 3")
    no_negative = make("no_negative", "a cat --d 3")
    zero = make("zero", "a cat --n blurry --d 3 --nl 0")
    strong = make("strong", "a cat --n blurry --d 3 --nl 4")
    from_flag = make("flag", "a cat --n blurry --d 3", "--negative_scale", "4")
    turned_off = make("off", "a cat --n blurry --d 3 --nl none", "--negative_scale", "2")
    # uncond + scale·(prompt − uncond) − 0·(negative − uncond), uncond = the empty prompt: the negative drops out
    assert np.abs(pixels(zero) - pixels(no_negative)).max() <= 2
    assert np.abs(pixels(zero) - pixels(plain)).max() > 10
    assert np.abs(pixels(strong) - pixels(zero)).max() > 2  # beyond batch rounding
    assert np.array_equal(pixels(from_flag), pixels(strong))
    assert np.array_equal(pixels(turned_off), pixels(plain))
    with Image.open(strong) as image:
        assert image.text["negative-scale"] == "4.0"
    with Image.open(turned_off) as image:
        assert "negative-scale" not in image.text
    # the PNG decides: its negative scale is used, and none stays none despite --negative_scale
    again = gen_img.main(["--ckpt", str(sd1_model), "--outdir", str(tmp_path / "again"), "--from_png", str(strong),
                          str(plain), "--negative_scale", "5"])
    assert np.array_equal(pixels(again[0]), pixels(strong)) and np.array_equal(pixels(again[1]), pixels(plain))


def test_negative_scale_without_guidance_is_ignored_with_a_warning(sd1_model, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="library.generation.run"):
        made = generate(sd1_model, tmp_path / "a", "--prompt", "a cat --d 3 --nl 2 --l 1")[0]
    plain = generate(sd1_model, tmp_path / "b", "--prompt", "a cat --d 3 --l 1")[0]
    assert np.array_equal(pixels(made), pixels(plain))
    assert "--prompt: --nl/--negative_scale 2.0 needs a CFG scale above 1 (got 1.0); ignored" in caplog.text
    with Image.open(made) as image:
        assert "negative-scale" not in image.text


def test_sdxl_negative_crop_and_target_are_stored_and_regenerate_the_image(tiny_models, tmp_path):
    model = tiny_models.path("sdxl")
    prompt = ["--prompt", "a cat --n blurry --d 5"]
    plain = generate(model, tmp_path / "plain", *prompt, script=sdxl_gen_img)[0]
    made = generate(model, tmp_path / "made", *prompt, "--crop_top_negative", "48", "--crop_left_negative", "16",
                    "--target_width_negative", "512", "--target_height_negative", "256", script=sdxl_gen_img)[0]
    assert np.abs(pixels(made) - pixels(plain)).max() > 0
    with Image.open(made) as image:
        text = dict(image.text)
    assert (text["crop-top-negative"], text["crop-left-negative"], text["target-width-negative"],
            text["target-height-negative"]) == ("48", "16", "512", "256")
    assert (text["crop-top"], text["target-width"]) == ("0", "64")
    again = sdxl_gen_img.main(["--ckpt", str(model), "--outdir", str(tmp_path / "again"), "--from_png", str(made)])
    assert np.array_equal(pixels(again[0]), pixels(made))


def _record_prediction_types(monkeypatch) -> list[str]:
    import library.sampling.pipeline as pipeline

    seen: list[str] = []
    make_sampler = pipeline.make_sampler

    def recording(*args, **kwargs):
        scheduler = make_sampler(*args, **kwargs)
        seen.append(scheduler.config.prediction_type)
        return scheduler

    monkeypatch.setattr(pipeline, "make_sampler", recording)
    return seen


def test_sdxl_v_parameterization_samples_with_v_prediction(tiny_models, tmp_path, monkeypatch):
    from dataclasses import replace

    from library.families import with_v_parameterization
    from library.models.save import save_model

    seen = _record_prediction_types(monkeypatch)
    model = tiny_models.path("sdxl")
    prompt = ["--prompt", "a cat --n blurry --d 2"]
    epsilon = generate(model, tmp_path / "eps", *prompt, script=sdxl_gen_img)[0]
    flagged = generate(model, tmp_path / "flag", *prompt, "--v_parameterization", script=sdxl_gen_img)[0]
    assert seen == ["epsilon", "v_prediction"]
    assert np.abs(pixels(flagged) - pixels(epsilon)).max() > 10
    with Image.open(flagged) as image:
        assert image.text["v-parameterization"] == "true"
    bundle = tiny_models.bundle("sdxl")
    v_bundle = replace(bundle, family=with_v_parameterization(bundle.family, True))
    v_file = save_model(v_bundle, tmp_path / "v-pred.safetensors")  # records modelspec.prediction_type = v
    from_file = generate(v_file, tmp_path / "from_file", *prompt, script=sdxl_gen_img)[0]
    v_folder = save_model(v_bundle, tmp_path / "v-pred-diffusers")
    generate(v_folder, tmp_path / "folder", *prompt, "--v_parameterization", script=sdxl_gen_img)
    assert seen[2:] == ["v_prediction", "v_prediction"]
    assert np.array_equal(pixels(from_file), pixels(flagged))


def test_interactive_prompts_from_the_console(sd1_model, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a cat --d 1\na dog --w 60\na bird --d 2\n\n"))
    paths = gen_img.main(["--ckpt", str(sd1_model), "--outdir", str(tmp_path), *FAST, "--interactive"])
    assert [int(path.stem.rsplit("_", 1)[1]) for path in paths] == [1, 2]  # the bad line is reported and skipped


# ----------------------------------------------------------------------------------------------- bad input


def test_sd1_lora_on_sdxl_is_refused_naming_the_file(tiny_models, sd1_lora, tmp_path, capsys):
    argv = ["--ckpt", str(tiny_models.path("sdxl")), "--outdir", str(tmp_path), "--prompt", "x",
            "--network_weights", str(sd1_lora)]
    line = run_error(sdxl_gen_img.main, argv, capsys)
    assert line.startswith("error: --network_weights") and str(sd1_lora) in line and "SDXL" in line


def test_embedding_of_the_wrong_width_is_refused(sd1_model, tmp_path, capsys):
    embedding = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(1, 1280)}, str(embedding))
    line = run_error(gen_img.main, ["--ckpt", str(sd1_model), "--outdir", str(tmp_path / "o"), "--prompt",
                                            "x", "--textual_inversion_embeddings", str(embedding)], capsys)
    assert str(embedding) in line and "1280" in line


def test_sdxl_embedding_on_sd1_is_refused(sd1_model, tmp_path, capsys):
    embedding = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(embedding))
    line = run_error(gen_img.main, ["--ckpt", str(sd1_model), "--outdir", str(tmp_path / "o"), "--prompt",
                                            "x", "--textual_inversion_embeddings", str(embedding)], capsys)
    assert str(embedding) in line and "clip_l" in line


@pytest.mark.parametrize("argv, expected", [
    (["--prompt", "x", "--network_weights", "missing.safetensors"],
     "--network_weights missing.safetensors: file not found"),
    (["--prompt", "x", "--textual_inversion_embeddings", "nope.pt"],
     "--textual_inversion_embeddings nope.pt: file not found"),
    (["--prompt", "x", "--image_path", "nope.png"], "--image_path nope.png: file not found"),
    (["--from_file", "nope.txt"], "--from_file nope.txt: file not found"),
    (["--prompt", "x --w 500"], "--w"),
    (["--prompt", "x", "--W", "500"], "multiple of 8"),
    (["--prompt", "x", "--sampler", "eular_a"], "invalid choice"),
    (["--prompt", "x --ss eular_a"], "euler_a"),
    (["--prompt", "x", "--fp16", "--bf16"], "--fp16 and --bf16"),
    ([], "no prompts"),
    (["--prompt", "x --am 1,2"], "--am"),
    (["--prompt", "x --c a photo of x"], "--prompt: --c: expected a supported prompt option; CLIP guidance is not "
                                         "supported"),
])
def test_bad_input_is_one_line_with_exit_code_2_before_the_model_loads(sd1_model, tmp_path, capsys, monkeypatch,
                                                                       argv, expected):
    monkeypatch.chdir(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr("library.models.load.load_target_model", no_loading)
    line = run_error(gen_img.main, ["--ckpt", str(sd1_model), "--outdir", str(tmp_path / "o"), *argv], capsys)
    assert expected in line


def test_an_outdir_that_cannot_be_written_and_a_utf16_prompt_file_are_refused_before_the_model_loads(
        sd1_model, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr("library.models.load.load_target_model", no_loading)
    blocker = tmp_path / "a-file"
    blocker.write_text("keep")
    base = ["--ckpt", str(sd1_model), "--prompt", "x"]
    line = run_error(gen_img.main, [*base, "--outdir", str(blocker)], capsys)
    assert line == f"error: --outdir {blocker}: is a file; expected a folder (or a path where one can be created)"
    line = run_error(gen_img.main, [*base, "--outdir", str(blocker / "images")], capsys)
    assert line == f"error: --outdir {blocker / 'images'}: cannot be created because {blocker} is a file"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-16")
    line = run_error(gen_img.main, ["--ckpt", str(sd1_model), "--outdir", str(tmp_path / "o"), "--from_file",
                                    str(prompts)], capsys)
    assert line == f"error: --from_file {prompts}: expected UTF-8 text, got UTF-16 text; save the file as UTF-8"
    assert blocker.read_text() == "keep"


def test_malformed_prompt_file_line_names_the_file_and_line(sd1_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog --s many\n", encoding="utf-8")
    line = run_error(gen_img.main, ["--ckpt", str(sd1_model), "--outdir", str(tmp_path / "o"),
                                            "--from_file", str(prompts)], capsys)
    assert f"{prompts}:2" in line and "--s" in line
    assert not (tmp_path / "o").exists()


def test_help_lists_the_generator_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sdxl_gen_img.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--ckpt", "--network_weights", "--textual_inversion_embeddings", "--from_file", "--highres_fix_scale",
                 "--original_width_negative", "--max_embeddings_multiples", "--sequential_file_name"):
        assert flag in text
