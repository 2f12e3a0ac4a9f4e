"""Crafted pickle files that run code when unpickled without weights_only: the code only creates a marker file,
so a test can tell whether anything was executed."""
from __future__ import annotations

from pathlib import Path

import torch


class MarkerPayload:
    """Unpickling this object (outside torch's weights-only unpickler) creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def write_payload(path: Path, marker: Path, content: dict | None = None) -> Path:
    """A torch.save file whose dict (by default empty) also holds the payload; returns `path`."""
    torch.save({**(content or {}), "payload": MarkerPayload(marker)}, path)
    return path
