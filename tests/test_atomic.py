"""The one atomic writer (sparse3d.atomic): all or nothing, no temporary file left behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import sparse3d
from sparse3d import atomic
from sparse3d.atomic import atomic_path, temp_name, write_json_atomic, write_text_atomic


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_under_a_temporary_name_in_the_same_folder(tmp_path):
    out = tmp_path / "a.bin"
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.bin.") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"new")
        assert not out.exists()  # nobody sees a half-written file
    assert out.read_bytes() == b"new"
    assert _names(tmp_path) == ["a.bin"]
    assert temp_name(out) != temp_name(out)  # fresh per call: concurrent writers never collide


def test_error_leaves_no_temporary_file_and_the_old_file(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert out.read_text() == "old"
    assert _names(tmp_path) == ["a.txt"]
    with pytest.raises(TypeError):
        write_json_atomic(out, {"x": object()})  # not serialisable: nothing written
    assert out.read_text() == "old" and _names(tmp_path) == ["a.txt"]


def test_overwrite_false_never_clobbers(tmp_path):
    out = tmp_path / "a.txt"
    write_text_atomic(out, "first", overwrite=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_text_atomic(out, "second", overwrite=False)
    assert out.read_text() == "first"
    # a file that appears while we write is not clobbered either
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_path(tmp_path / "b.txt", overwrite=False) as tmp:
            tmp.write_text("ours")
            (tmp_path / "b.txt").write_text("theirs")
    assert (tmp_path / "b.txt").read_text() == "theirs"
    assert _names(tmp_path) == ["a.txt", "b.txt"]
    write_text_atomic(out, "third")  # overwrite=True (the default) replaces
    assert out.read_text() == "third"


def test_no_clobber_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(atomic.os, "link", no_links)
    out = tmp_path / "a.txt"
    write_text_atomic(out, "first", overwrite=False)
    assert out.read_text() == "first"
    with pytest.raises(FileExistsError):
        write_text_atomic(out, "second", overwrite=False)
    with pytest.raises(FileExistsError):
        with atomic_path(tmp_path / "b.txt", overwrite=False) as tmp:
            tmp.write_text("ours")
            (tmp_path / "b.txt").write_text("theirs")  # appears before the commit
    assert out.read_text() == "first" and (tmp_path / "b.txt").read_text() == "theirs"
    assert _names(tmp_path) == ["a.txt", "b.txt"]


def test_missing_folder_is_refused_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_path(tmp_path / "nope" / "a.txt")
    # the convenience writers create the folder
    p = write_json_atomic(tmp_path / "new" / "m.json", {"b": 1, "a": float("nan")})
    assert p.read_text().endswith("\n")
    assert list(json.loads(p.read_text())) == ["a", "b"]  # sorted keys


def test_commit_and_abort_for_writers_that_span_calls(tmp_path):
    out = tmp_path / "r.h5"
    target = atomic_path(out)
    target.tmp.write_text("streamed")
    target.abort()
    assert _names(tmp_path) == []
    target = atomic_path(out)
    target.tmp.write_text("streamed")
    assert target.commit() == out and out.read_text() == "streamed"
    assert _names(tmp_path) == ["r.h5"]


def test_every_writer_of_the_package_uses_it():
    """No module of sparse3d renames files itself (one atomic writer), except those listed
    while they move over."""
    root = Path(sparse3d.__file__).parent
    pending: set[str] = set()  # modules still to switch to sparse3d.atomic (none)
    rename = re.compile(r"os\.(replace|rename)\(|\.(replace|rename)\([^,()]*\)")
    found = [
        f.relative_to(root).as_posix()
        for f in sorted(root.rglob("*.py"))
        if rename.search(f.read_text())
    ]
    assert sorted(set(found) - pending) == ["atomic.py"]


def test_commit_dir_replaces_a_folder_only_when_asked(tmp_path):
    from sparse3d.atomic import commit_dir, temp_name

    out = tmp_path / "seg.zarr"
    for content, overwrite in (("first", False), ("second", True)):
        tmp = temp_name(out)
        tmp.mkdir()
        (tmp / "0").write_text(content)
        assert commit_dir(tmp, out, overwrite) == out
    assert (out / "0").read_text() == "second" and _names(tmp_path) == ["seg.zarr"]
    tmp = temp_name(out)
    tmp.mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        commit_dir(tmp, out, overwrite=False)
    assert _names(tmp_path) == ["seg.zarr"] and (out / "0").read_text() == "second"
