"""tools/show_metadata.py: golden output of a small file, JSON values shortened unless --full, --json parses,
no-metadata files, and non-safetensors input refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.cli import run_cli
from tools import show_metadata

TAGS = {"1_style": {"red": 3, "blue": 1}}


@pytest.fixture()
def small_file(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={
        "ss_network_dim": "4", "ss_v2": "False", "ss_tag_frequency": json.dumps(TAGS),
        "modelspec.title": "style"})
    return path


def test_golden_output(small_file, capsys):
    show_metadata.main([str(small_file)])
    assert capsys.readouterr().out == "\n".join([
        f"{small_file}: 4 metadata keys",
        "modelspec.title: style",
        "ss_network_dim: 4",
        "ss_tag_frequency:",
        "  {",
        '    "1_style": {',
        '      "blue": 1,',
        '      "red": 3',
        "    }",
        "  }",
        "ss_v2: False",
    ]) + "\n"


def test_long_json_values_are_shortened_unless_full(small_file, capsys):
    show_metadata.main([str(small_file), "--max_lines", "2"])
    shortened = capsys.readouterr().out.splitlines()
    assert shortened[4:7] == ["  {", '    "1_style": {', "  ... (4 more lines; --full shows all)"]
    show_metadata.main([str(small_file), "--max_lines", "2", "--full"])
    assert len(capsys.readouterr().out.splitlines()) == 11


def test_json_output_parses_with_decoded_values(small_file, capsys):
    show_metadata.main(["--model", str(small_file), "--json"])
    assert json.loads(capsys.readouterr().out) == {"modelspec.title": "style", "ss_network_dim": "4",
                                                   "ss_tag_frequency": TAGS, "ss_v2": "False"}


def test_a_file_without_metadata_says_so(tmp_path, capsys):
    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    assert show_metadata.main([str(path)]) == {}
    assert capsys.readouterr().out == f"{path}: no metadata\n"


def test_a_ckpt_is_refused_with_one_line(tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(1)}, str(path))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(show_metadata.main, [str(path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {path}: is not a safetensors file (no valid header); only "
                                       ".safetensors files carry metadata (.ckpt/.pt files have none)\n")


@pytest.mark.parametrize("script, flags", [
    ("tools/show_metadata.py", ["--json", "--full"]),
    ("networks/check_lora_weights.py", ["--json", "--show_all"]),
    ("networks/extract_lora_from_models.py", ["--model_org", "--model_tuned", "--dim", "--conv_dim", "--clamp_quantile",
                                              "--min_diff", "--device"]),
])
def test_lora_inspection_tools_explain_their_flags(script, flags):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(root / script), "--help"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("usage:")
    for flag in flags:
        assert flag in result.stdout


def save_with_metadata(path, metadata):
    save_file({"w": torch.zeros(1)}, str(path), metadata=metadata)
    return path


def test_deeply_nested_json_is_shown_as_its_shortened_string(tmp_path, capsys):
    nested = "[" * 100_000 + "]" * 100_000
    path = save_with_metadata(tmp_path / "deep.safetensors", {"ss_deep": nested, "ss_network_dim": "4"})
    assert run_cli(show_metadata.main, [str(path)]) is None  # no SystemExit: exit code 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.out.splitlines()
    assert lines[1] == f"ss_deep: {'[' * 2000} ... (198,000 more characters; --full shows all)"
    assert lines[2] == "ss_network_dim: 4"
    show_metadata.main([str(path), "--json"])
    assert json.loads(capsys.readouterr().out) == {"ss_deep": nested, "ss_network_dim": "4"}  # stays a string


def test_a_huge_value_is_capped_unless_full(tmp_path, capsys):
    huge = "x" * 20_000_000
    path = save_with_metadata(tmp_path / "huge.safetensors", {"ss_huge": huge, "ss_lines": "line\n" * 50})
    show_metadata.main([str(path)])
    out = capsys.readouterr().out
    assert len(out) < 10_000
    lines = out.splitlines()
    assert lines[1] == f"ss_huge: {'x' * 2000} ... (19,998,000 more characters; --full shows all)"
    assert lines[2:4] == ["ss_lines:", "  line"] and lines[-1] == "  ... (30 more lines; --full shows all)"
    assert len(lines) == 2 + 1 + 20 + 1
    show_metadata.main([str(path), "--full"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"ss_huge: {huge}" and len(lines) == 2 + 1 + 50
