"""Session fixtures: tiny random-weight SD1 / SD2-v / SDXL models (real topology), written in every format."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

FAMILY_NAMES = ("sd1", "sd2-v", "sdxl")


class TinyModels:
    """Builds each tiny model once per session and writes it in any format/precision on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._bundles: dict = {}
        self._files: dict = {}

    def bundle(self, family: str):
        if family not in self._bundles:
            from library.models.tiny import build_tiny_bundle

            self._bundles[family] = build_tiny_bundle(family, seed=0)
        return self._bundles[family]

    def path(self, family: str, save_model_as: str = "safetensors", precision: str | None = None) -> Path:
        key = (family, save_model_as, precision)
        if key not in self._files:
            from library.models.save import save_model

            suffix = {"safetensors": ".safetensors", "ckpt": ".ckpt"}.get(save_model_as, "")
            path = self.folder / f"tiny-{family}-{save_model_as}-{precision or 'native'}{suffix}"
            save_model(self.bundle(family), path, save_model_as=save_model_as, precision=precision)
            self._files[key] = path
        return self._files[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture()
def small_disk(tmp_path):
    """A factory of small tmpfs file systems (`small_disk(size_kib)` -> folder) for full-disk tests; skips with the
    reason where the machine does not allow mounting one (no root, no mount permission in a container)."""
    import shutil
    import subprocess

    mounted = []

    def make(size_kib: int) -> Path:
        if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a full-disk test needs root to mount a small tmpfs")
        folder = tmp_path / f"small-disk-{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                                capture_output=True, text=True, check=False)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
