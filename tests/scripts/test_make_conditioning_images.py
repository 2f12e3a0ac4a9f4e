"""tools/make_conditioning_images.py on tiny generated images: output names and sizes, where the Canny edges are,
the thresholds' effect, keeping existing outputs, --recursive, and each kind of bad input (exit 2, one line)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from library.cli import run_cli
from tests.cli_helpers import run_error
from tests.conftest import ROOT
from tools import make_conditioning_images as tool

SCRIPT = "tools/make_conditioning_images.py"
SIZE = (64, 48)  # width, height
BOX = (16, 12, 47, 35)  # the rectangle's left, top, right, bottom pixels (inclusive)


def draw_box(path, foreground=255, background=0, size=SIZE, mode="RGB"):
    """A filled gray-level rectangle at BOX on a flat background, saved in `mode`."""
    image = Image.new("L", size, background)
    ImageDraw.Draw(image).rectangle(BOX, fill=foreground)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert(mode).save(path)
    return path


def edges(path) -> np.ndarray:
    """The output as a boolean edge map, after checking it is white-on-black RGB with equal channels."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        pixels = np.asarray(image)
    assert set(np.unique(pixels)) <= {0, 255}
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    return pixels[..., 0] == 255


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress bar (tqdm redraws with carriage returns)."""
    return [line for line in stderr.splitlines() if line.strip() and "img/s" not in line]


def test_one_png_per_image_with_its_name_and_size(tmp_path, capsys):
    source, destination = tmp_path / "src", tmp_path / "dst"
    inputs = {"a.png": draw_box(source / "a.png"), "b.png": draw_box(source / "b.JPG", size=(40, 30)),
              "c.png": draw_box(source / "c.webp", mode="RGBA"), "d.png": draw_box(source / "d.bmp", mode="P"),
              "e.png": draw_box(source / "e.png", mode="LA")}
    (source / "a.txt").write_text("a caption")
    summary = tool.main([str(source), str(destination)])
    names = sorted(path.name for path in destination.iterdir())
    assert names == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert summary.written == [destination / name for name in names] and summary.exit_code == 0
    for name, original in inputs.items():
        with Image.open(original) as image, Image.open(destination / name) as output:
            assert output.size == image.size and output.mode == "RGB"
        assert edges(destination / name).any()
    assert capsys.readouterr().out.strip().splitlines()[-1] == "written 5, skipped 0 existing, failed 0"


def test_canny_edges_lie_on_the_rectangle_border_only(tmp_path):
    source, destination = tmp_path / "src", tmp_path / "dst"
    draw_box(source / "box.png")
    tool.main([str(source), str(destination)])
    edge = edges(destination / "box.png")
    left, top, right, bottom = BOX
    # each side of the border has an edge pixel within one pixel of it, along its whole inner length
    assert edge[top + 2:bottom - 1, left - 1:left + 1].any(axis=1).all()
    assert edge[top + 2:bottom - 1, right:right + 2].any(axis=1).all()
    assert edge[top - 1:top + 1, left + 2:right - 1].any(axis=0).all()
    assert edge[bottom:bottom + 2, left + 2:right - 1].any(axis=0).all()
    # nothing in the flat regions: inside the rectangle, and the background away from it
    assert not edge[top + 2:bottom - 1, left + 2:right - 1].any()
    ring = np.ones_like(edge)
    ring[top - 2:bottom + 3, left - 2:right + 3] = False
    assert not edge[ring].any()


def test_thresholds_decide_whether_a_faint_edge_counts(tmp_path):
    source = tmp_path / "src"
    draw_box(source / "faint.png", foreground=100, background=80)  # a step of 20 gray levels: Sobel gradient 80
    tool.main([str(source), str(tmp_path / "default")])
    assert not edges(tmp_path / "default" / "faint.png").any()  # 100/200: too faint
    tool.main([str(source), str(tmp_path / "low"), "--low_threshold", "10", "--high_threshold", "40"])
    assert edges(tmp_path / "low" / "faint.png").sum() > 50


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, capsys):
    source, destination = tmp_path / "src", tmp_path / "dst"
    draw_box(source / "a.png")
    draw_box(source / "b.png")
    destination.mkdir()
    (destination / "a.png").write_bytes(b"made by hand")
    summary = tool.main([str(source), str(destination)])
    assert summary.skipped == [destination / "a.png"] and summary.written == [destination / "b.png"]
    assert (destination / "a.png").read_bytes() == b"made by hand"
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("written 1, skipped 1 existing, failed 0")
    summary = tool.main([str(source), str(destination), "--overwrite"])
    assert summary.written == [destination / "a.png", destination / "b.png"] and not summary.skipped
    assert edges(destination / "a.png").any()
    assert sorted(path.name for path in destination.iterdir()) == ["a.png", "b.png"]  # no temp files left


def test_recursive_mirrors_subfolders(tmp_path):
    source, destination = tmp_path / "src", tmp_path / "dst"
    for relative in ("top.png", "sub/mid.jpg", "sub/deeper/low.webp"):
        draw_box(source / relative)
    assert tool.main([str(source), str(destination)]).written == [destination / "top.png"]
    summary = tool.main([str(source), str(destination), "--recursive"])
    assert summary.written == [destination / "sub" / "deeper" / "low.png", destination / "sub" / "mid.png"]
    assert summary.skipped == [destination / "top.png"]
    assert sorted(path.relative_to(destination).as_posix() for path in destination.rglob("*.png")) == [
        "sub/deeper/low.png", "sub/mid.png", "top.png"]


def test_recursive_into_a_folder_inside_the_source_leaves_its_outputs_alone(tmp_path):
    source = tmp_path / "src"
    draw_box(source / "a.png")
    destination = source / "conditioning"
    assert tool.main([str(source), str(destination), "--recursive"]).written == [destination / "a.png"]
    summary = tool.main([str(source), str(destination), "--recursive"])
    assert summary.skipped == [destination / "a.png"] and not summary.written
    assert not (destination / "conditioning").exists()


def test_a_corrupt_image_is_named_and_the_others_are_written(tmp_path, capsys):
    source, destination = tmp_path / "src", tmp_path / "dst"
    draw_box(source / "a.png")
    (source / "broken.jpg").write_bytes(b"not a jpeg")
    draw_box(source / "c.png")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tool.command_line, [str(source), str(destination)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    failures = [line for line in error_lines(captured.err) if "broken.jpg" in line]
    assert len(failures) == 1 and "failed: " in failures[0] and "cannot identify image file" in failures[0]
    assert captured.out.strip().splitlines()[-1] == "written 2, skipped 0 existing, failed 1"
    assert sorted(path.name for path in destination.iterdir()) == ["a.png", "c.png"]


def test_the_command_line_exits_1_on_a_corrupt_image(tmp_path):
    source, destination = tmp_path / "src", tmp_path / "dst"
    draw_box(source / "a.png")
    (source / "broken.png").write_bytes(b"\x89PNG truncated")
    result = run_script(source, destination)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "broken.png" in result.stderr
    assert result.stdout.strip() == "written 1, skipped 0 existing, failed 1"
    assert (destination / "a.png").exists()


@pytest.mark.parametrize("kind", ["depth", "pose"])
def test_neural_kinds_are_refused_with_one_line(tmp_path, kind):
    source, destination = tmp_path / "src", tmp_path / "dst"
    draw_box(source / "a.png")
    result = run_script(source, destination, "--kind", kind)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --kind {kind}: ") and "not available offline" in lines[0]
    assert "external preprocessor" in lines[0] and "base names" in lines[0]
    assert not destination.exists()


def test_a_missing_source_is_one_line_without_traceback(tmp_path):
    result = run_script(tmp_path / "nowhere", tmp_path / "dst")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"error: SRC_DIR {tmp_path / 'nowhere'}: folder not found"]


def _missing(folder):
    return folder.with_name("missing")


def _a_file(folder):
    (folder.parent / "file.png").write_bytes(b"")
    return folder.parent / "file.png"


def _no_images(folder):
    (folder / "notes.txt").write_text("no images")
    return folder


def _only_in_subfolders(folder):
    draw_box(folder / "sub" / "a.png")
    return folder


def _one_image(folder):
    draw_box(folder / "a.png")
    return folder


def _same_stem(folder):
    draw_box(folder / "a.jpg")
    draw_box(folder / "a.png")
    return folder


@pytest.mark.parametrize("make_source,args,message", [
    (_missing, [], "folder not found"),
    (_a_file, [], "is not a folder"),
    (_no_images, [], "no images"),
    (_only_in_subfolders, [], "add --recursive"),
    (_one_image, ["--low_threshold", "300"], "--low_threshold 300: expected a value from 0 to 255"),
    (_one_image, ["--high_threshold", "-1"], "--high_threshold -1: expected a value from 0 to 255"),
    (_one_image, ["--low_threshold", "150", "--high_threshold", "100"],
     "--low_threshold 150 is above --high_threshold 100"),
    (_same_stem, [], "a.jpg and a.png would both be written as"),
], ids=["missing", "a-file", "no-images", "only-in-subfolders", "low-too-high", "high-negative", "low-above-high",
        "same-stem"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, make_source, args, message):
    folder = tmp_path / "src"
    folder.mkdir()
    source, destination = make_source(folder), tmp_path / "dst"
    line = run_error(tool.command_line, [str(source), str(destination), *args], capsys)
    assert line.startswith("error: ") and message in line
    assert not destination.exists()


def test_destination_equal_to_source_is_refused(tmp_path, capsys):
    source = tmp_path / "src"
    draw_box(source / "a.png")
    line = run_error(tool.command_line, [str(source), str(source / ".." / "src")], capsys)
    assert "is SRC_DIR" in line
    assert sorted(path.name for path in source.iterdir()) == ["a.png"]


def test_a_destination_that_is_a_file_is_refused(tmp_path, capsys):
    source = tmp_path / "src"
    draw_box(source / "a.png")
    (tmp_path / "dst").write_text("a file")
    line = run_error(tool.command_line, [str(source), str(tmp_path / "dst")], capsys)
    assert "exists and is not a folder" in line


def test_help_describes_exit_codes_and_kinds():
    result = run_script("--help")
    assert result.returncode == 0
    assert "Exit codes:" in result.stdout and "--kind {canny,depth,pose}" in result.stdout
    assert "some images could not be read" in result.stdout
