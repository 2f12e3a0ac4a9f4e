"""tools/resize_images_to_resolution.py run in-process on a small folder."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from library.errors import FlagError
from tools import resize_images_to_resolution as tool


@pytest.fixture()
def source(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "big.png")
    Image.fromarray(pixels[:50, :70]).save(folder / "small.PNG")
    (folder / "big.txt").write_text("a caption")
    (folder / "notes.md").write_text("not an image")
    return folder


def test_shrinks_to_each_area_never_enlarges_and_copies_captions(source, tmp_path):
    destination = tmp_path / "dst"
    written = tool.main([str(source), str(destination), "--max_resolution", "200x150,100x100", "--divisible_by", "8",
                         "--save_as_png", "--copy_associated_files"])
    names = sorted(path.name for path in destination.iterdir())
    assert names == ["big+100x100.png", "big+100x100.txt", "big+200x150.png", "big+200x150.txt", "big.txt",
                     "notes.md", "small+100x100.png", "small+200x150.png"]
    assert sorted(path.name for path in written) == names
    # 400x300 -> 30000 px: factor sqrt(30000/120000) = 0.5 -> 200x150, then 8 | 200, 150 -> 144
    assert Image.open(destination / "big+200x150.png").size == (200, 144)
    # 10000 px: factor sqrt(1/12) = 0.2887 -> int(115.47) x int(86.60) = 115x86 -> 112x80
    assert Image.open(destination / "big+100x100.png").size == (112, 80)
    # 70x50 = 3500 px is below both areas: kept, only cut to multiples of 8 (64x48, centered)
    small = np.asarray(Image.open(destination / "small+100x100.png"))
    original = np.asarray(Image.open(source / "small.PNG"))
    assert small.shape == (48, 64, 3)
    assert np.array_equal(small, original[1:49, 3:67])
    assert (destination / "big+200x150.txt").read_text() == "a caption"


def test_jpeg_output_by_default(source, tmp_path):
    destination = tmp_path / "dst"
    tool.main([str(source), str(destination), "--max_resolution", "200x150"])
    with Image.open(destination / "big+200x150.jpg") as image:
        assert image.format == "JPEG" and image.size == (200, 150)
    assert not (destination / "big+200x150.txt").exists()  # only with --copy_associated_files


def test_refuses_to_write_into_the_source_folder(source):
    with pytest.raises(FlagError, match="is the source folder"):
        tool.main([str(source), str(source / ".." / "src")])
    assert sorted(path.name for path in source.iterdir()) == ["big.png", "big.txt", "notes.md", "small.PNG"]


def test_bad_max_resolution_names_the_flag(source, tmp_path):
    with pytest.raises(FlagError, match=r"--max_resolution '512x,256x256': expected comma-separated WxH sizes"):
        tool.main([str(source), str(tmp_path / "dst"), "--max_resolution", "512x,256x256"])


def test_unreadable_images_are_skipped(source, tmp_path):
    (source / "broken.jpg").write_bytes(b"not a jpeg")
    written = tool.main([str(source), str(tmp_path / "dst"), "--max_resolution", "100x100"])
    assert not any(path.name.startswith("broken") for path in written)
    assert (tmp_path / "dst" / "big+100x100.jpg").exists()
