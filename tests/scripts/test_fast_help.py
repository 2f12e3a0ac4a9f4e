"""`--help` and argparse usage errors of every command-line script answer at once: they must not import torch,
diffusers, transformers, accelerate, safetensors or numpy (seconds of start-up) before the arguments are parsed."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

HEAVY_MODULES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy")
SCRIPT_FOLDERS = (".", "tools", "networks", "finetune")

# Runs a script as `python script args...` would, then reports which heavy modules its SystemExit left loaded.
WRAPPER = f"""
import runpy, sys
script, *args = sys.argv[1:]
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit:
    loaded = [name for name in {HEAVY_MODULES!r} if name in sys.modules]
    print("heavy modules loaded: " + (", ".join(loaded) or "none"), file=sys.stderr)
    raise
print("the script returned without exiting", file=sys.stderr)
"""


def _is_cli_script(path: Path) -> bool:
    """A module-level `main` plus argparse (or a `setup_parser` that composes another script's parser)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    imports_argparse = any(isinstance(node, ast.Import) and any(alias.name == "argparse" for alias in node.names)
                           for node in tree.body)
    return "main" in functions and (imports_argparse or "setup_parser" in functions)


def cli_scripts() -> list[str]:
    found = []
    for folder in SCRIPT_FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if _is_cli_script(path):
                found.append(name)
    return found


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_every_entry_point_is_found():
    scripts = cli_scripts()
    for expected in ("train_network.py", "sdxl_train_network.py", "gen_img.py", "sdxl_gen_img.py",
                     "tools/show_metadata.py", "networks/merge_lora.py", "networks/sdxl_merge_lora.py",
                     "finetune/prepare_buckets_latents.py"):
        assert expected in scripts
    assert "networks/lora.py" not in scripts  # a network module, not a command


@pytest.mark.parametrize("script", cli_scripts())
def test_help_does_not_import_heavy_modules(script):
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert "heavy modules loaded: none" in result.stderr, result.stderr


@pytest.mark.parametrize("script,args,message", [
    ("train_network.py", ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("train_network.py", ["--max_train_steps", "many"], "argument --max_train_steps: invalid"),
    ("gen_img.py", ["--W", "100"], "argument --W: expected a multiple of 8 >= 64"),
])
def test_usage_error_exits_2_without_heavy_modules(script, args, message):
    result = run_script(script, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "heavy modules loaded: none" in result.stderr, result.stderr
