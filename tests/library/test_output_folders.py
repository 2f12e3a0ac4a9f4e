"""Output-folder checks before a run: writable, and enough free space for the saves the flags ask for."""
from __future__ import annotations

import argparse
import logging
from collections import namedtuple

import pytest

from library.errors import FlagError
from library.output_folders import check_free_space, check_writable_folder
from library.train.checkpoints import PlannedSaves, planned_saves

SAVE_FLAGS = dict(save_every_n_epochs=None, save_every_n_steps=None, save_last_n_epochs=None,
                  save_last_n_steps=None, save_last_n_epochs_state=None, save_last_n_steps_state=None,
                  save_state=False, save_state_on_train_end=False)


@pytest.mark.parametrize("flags, epochs, steps, expected", [
    ({}, 10, 100, PlannedSaves(1, 1, 0, 0)),
    # epochs 2, 4, 6, 8 saved (not 10: the final save covers it), all kept, one more while the next is written
    ({"save_every_n_epochs": 2}, 10, 100, PlannedSaves(5, 5, 0, 0)),
    ({"save_every_n_epochs": 1, "save_last_n_epochs": 2}, 10, 100, PlannedSaves(10, 4, 0, 0)),
    ({"save_every_n_steps": 10, "save_state": True}, 1, 100, PlannedSaves(11, 11, 11, 11)),
    ({"save_every_n_steps": 10, "save_last_n_steps": 20, "save_state": True}, 1, 100, PlannedSaves(11, 5, 11, 5)),
    ({"save_state_on_train_end": True}, 3, 30, PlannedSaves(1, 1, 1, 1)),
])
def test_planned_saves_count_what_pruning_keeps(flags, epochs, steps, expected):
    assert planned_saves(argparse.Namespace(**{**SAVE_FLAGS, **flags}), epochs, steps) == expected


@pytest.fixture()
def free_space(monkeypatch):
    usage = namedtuple("usage", "total used free")

    def set_free(free: int) -> None:
        monkeypatch.setattr("library.output_folders.shutil.disk_usage", lambda path: usage(1 << 40, 0, free))

    return set_free


def test_free_space_refuses_the_impossible_warns_when_tight_and_is_quiet_otherwise(tmp_path, free_space, caplog):
    arguments = dict(minimum=10 << 20, planned=100 << 20, flag="--output_dir", minimum_what="the final network",
                     planned_what="the 10 network file(s) the flags ask for")
    free_space(5 << 20)
    with pytest.raises(FlagError) as raised:
        check_free_space(tmp_path / "out", **arguments)
    assert str(raised.value) == (f"--output_dir {tmp_path / 'out'}: only 5.0 MiB free there, but the final network "
                                 "needs about 10.0 MiB; free some space or choose another --output_dir")
    free_space(50 << 20)
    with caplog.at_level(logging.WARNING):
        check_free_space(tmp_path / "out", **arguments)
    assert "50.0 MiB free there, but the 10 network file(s) the flags ask for need about 100.0 MiB" in caplog.text
    caplog.clear()
    free_space(1 << 30)
    with caplog.at_level(logging.WARNING):
        check_free_space(tmp_path / "out", **arguments)
    assert caplog.text == ""


def test_a_writable_folder_is_not_created_by_the_check(tmp_path):
    check_writable_folder(tmp_path / "new" / "deeper", "--output_dir")
    assert list(tmp_path.iterdir()) == []
