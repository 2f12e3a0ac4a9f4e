"""The main job on the embedded default: build a tiny SDXL, train a LoRA on the bundled tiny dataset (with samples
during training), then generate images with the trained LoRA through sdxl_gen_img.py.

Run by `bash scripts/demo.sh`. Everything is local: the tiny model is built from random weights with the real
SDXL topology (`tools/make_tiny_model.py`), the tokenizers from the bundled CLIP vocabulary, and the dataset is
`examples/tiny_dataset` (8 small images with captions). Training goes through `sdxl_train_network.py` with the
same flags a user passes to `accelerate launch`, generation through sdxl_gen_img.py; both commands are printed.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli

logger = logging.getLogger("demo")

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "examples" / "tiny_dataset" / "images"
PROMPTS = """# sample prompts (kohya's format: --n negative, --w/--h size, --d seed, --s steps, --l guidance)
tkshape, a red circle on a white background --n blurry --d 1 --s 12
tkshape, a blue square on a white background --d 2 --s 12 --l 5
"""


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="where the demo writes (default: demo_output)")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--console_log_level", default=None, help="logging level (DEBUG shows tracebacks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights and of training")
    return parser


def write_inputs(run_dir: Path) -> tuple[Path, Path]:
    dataset_toml = run_dir / "dataset.toml"
    dataset_toml.write_text(f"""[general]
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{DATASET.as_posix()}'
  num_repeats = 2
""")
    prompts = run_dir / "prompts.txt"
    prompts.write_text(PROMPTS)
    return dataset_toml, prompts


def training_argv(model: Path, dataset_toml: Path, prompts: Path, run_dir: Path, steps: int, seed: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(dataset_toml),
            "--output_dir", str(run_dir / "lora"), "--output_name", "tkshape",
            "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "4",
            "--network_args", "conv_dim=4", "conv_alpha=2",
            "--learning_rate", "2e-3", "--text_encoder_lr", "5e-4", "--optimizer_type", "AdamW",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.1", "--max_train_steps", str(steps),
            "--save_every_n_steps", str(max(1, steps // 2)), "--seed", str(seed), "--max_token_length", "225",
            "--sample_prompts", str(prompts), "--sample_every_n_steps", str(max(1, steps // 2)),
            "--sample_at_first", "--sample_sampler", "euler_a",
            "--logging_dir", str(run_dir / "logs"), "--training_comment", "tools/demo.py on the tiny SDXL"]


def generation_argv(model: Path, lora: Path, run_dir: Path, seed: int) -> list[str]:
    """Four images from the trained LoRA, two prompts at full and half LoRA strength (per-prompt --am)."""
    prompts = run_dir / "generate.txt"
    prompts.write_text("tkshape, a red circle on a white background --n blurry --am 1.0\n"
                       "tkshape, a blue square on a white background --am 0.5 --l 5\n", encoding="utf-8")
    return ["--ckpt", str(model), "--network_module", "networks.lora", "--network_weights", str(lora),
            "--from_file", str(prompts), "--images_per_prompt", "2", "--batch_size", "2", "--W", "64", "--H", "64",
            "--steps", "12", "--sampler", "euler_a", "--scale", "7", "--seed", str(seed), "--max_embeddings_multiples",
            "3", "--outdir", str(run_dir / "generated")]


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    import sdxl_train_network
    from tools import make_tiny_model

    run_dir = Path(args.output_dir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    model = run_dir / "tiny-sdxl.safetensors"
    make_tiny_model.main([str(model), "--family", "sdxl", "--seed", str(args.seed)])
    dataset_toml, prompts = write_inputs(run_dir)
    train_argv = training_argv(model, dataset_toml, prompts, run_dir, args.steps, args.seed)
    print("training: accelerate launch sdxl_train_network.py " + shlex.join(train_argv), flush=True)
    started = time.time()
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    lora = trainer.train(sdxl_train_network.train_network.parse_args(sdxl_train_network.setup_parser(), train_argv))
    losses = trainer.loss_history
    window = max(1, len(losses) // 5)
    samples = sorted((run_dir / "lora" / "sample").glob("*.png"))
    print(f"\nbase model   : {model} (tiny SDXL, random weights)")
    print(f"LoRA         : {lora}")
    print(f"intermediate : {', '.join(p.name for p in sorted(lora.parent.glob('tkshape-step*.safetensors')))}")
    print(f"samples      : {len(samples)} images in {run_dir / 'lora' / 'sample'}")
    print(f"logs         : {run_dir / 'logs'} (tensorboard --logdir {run_dir / 'logs'})")
    print(f"loss         : first {window} steps {sum(losses[:window]) / window:.4f} -> last {window} steps "
          f"{sum(losses[-window:]) / window:.4f} over {len(losses)} steps in {time.time() - started:.0f} s")

    import sdxl_gen_img

    gen_argv = generation_argv(model, lora, run_dir, args.seed)
    print("\ngenerating: python sdxl_gen_img.py " + shlex.join(gen_argv), flush=True)
    started = time.time()
    images = sdxl_gen_img.main(gen_argv)
    print(f"generated    : {len(images)} images with the LoRA in {run_dir / 'generated'} "
          f"({time.time() - started:.0f} s; each PNG stores its prompt, seed and settings)")


if __name__ == "__main__":
    run_cli(main)
