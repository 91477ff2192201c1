"""Atomic outputs: renamed into place only on success, with the mode a plain open() gives."""

from __future__ import annotations

import os

import pytest

from i2e_deploy.errors import I2EError
from i2e_deploy.fileio import atomic_output, atomic_path, copy_into_place


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def test_outputs_get_the_mode_open_would_give(tmp_path, umask_027):
    with atomic_output(tmp_path / "report.json", "w") as fh:
        fh.write("{}")
    copied = copy_into_place(tmp_path / "report.json", tmp_path / "sub" / "copy.json")
    for path in (tmp_path / "report.json", copied):
        assert path.stat().st_mode & 0o777 == umask_027
    assert copied.read_text() == "{}"


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_unwritable_destination_is_a_clean_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(I2EError, match="cannot write"):
        copy_into_place(blocker, blocker / "below" / "x.onnx")
