"""The main job on the embedded default: build a tiny SDXL, convert it both ways, load it, encode a long prompt.

Run by `bash scripts/demo.sh`. Everything is local: the tiny model is built from random weights with the real
SDXL topology, the tokenizers from the bundled CLIP vocabulary. (Later stages add LoRA training and generation.)
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli

logger = logging.getLogger("demo")

LONG_PROMPT = ", ".join(["a watercolor painting of a lighthouse on a cliff at dawn"] * 12)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="where the demo writes (default: demo_output)")
    parser.add_argument("--console_log_level", default=None, help="logging level (DEBUG shows tracebacks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    import torch

    from library.families import SDXL
    from library.models.load import load_target_model
    from library.models.state_dict_io import read_state_dict
    from library.text.sdxl_cond import encode_sdxl, size_embeddings
    from library.text.tokenize import load_tokenizers, tokenize_chunks
    from tools import convert_diffusers20_original_sd as convert_tool
    from tools import make_tiny_model

    out = Path(args.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    single = out / f"tiny-sdxl-{stamp}.safetensors"
    folder = out / f"tiny-sdxl-{stamp}-diffusers"
    back = out / f"tiny-sdxl-{stamp}-roundtrip.safetensors"

    make_tiny_model.main([str(single), "--family", "sdxl", "--seed", str(args.seed)])
    convert_tool.main([str(single), str(folder)])
    convert_tool.main([str(folder), str(back)])
    bundle = load_target_model(back, expected_families=("sdxl",))

    tokenizers = load_tokenizers(SDXL)
    ids = [tokenize_chunks(tokenizer, [LONG_PROMPT], max_token_length=225) for tokenizer in tokenizers]
    with torch.no_grad():
        conds = encode_sdxl(bundle.text_encoders, ids[0], ids[1])
        sizes = size_embeddings(torch.tensor([[1024, 1024]]), torch.tensor([[0, 0]]), torch.tensor([[1024, 1024]]),
                                dim=bundle.unet.config.addition_time_embed_dim)
    content_tokens = len(tokenizers[0](LONG_PROMPT, verbose=False).input_ids) - 2
    first, again = read_state_dict(single), read_state_dict(back)
    exact = first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)
    print(f"built tiny SDXL        : {single}")
    print(f"converted to diffusers : {folder}")
    print(f"converted back         : {back} (loaded as {bundle.family.name}, "
          f"{sum(p.numel() for m in bundle.models() for p in m.parameters()) / 1e6:.1f} M parameters)")
    print(f"round trip             : {len(first)} tensors, {'bit-identical' if exact else 'DIFFERENT'}")
    print(f"long prompt            : {content_tokens} tokens -> {ids[0].shape[1]} chunks of 77 "
          "(--max_token_length 225)")
    print(f"UNet context           : {tuple(conds.hidden_states.shape)} (TE1 + TE2 penultimate layers)")
    print(f"pooled (TE2 projection): {tuple(conds.pooled.shape)}; size conditioning: {tuple(sizes.shape)}")


if __name__ == "__main__":
    run_cli(main)
