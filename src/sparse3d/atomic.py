"""The one atomic writer: write under a temporary name in the target's folder, then rename.

A reader never sees a half-written file: the data goes to ``.<name>.<random>.tmp`` beside the
target and is renamed onto it only when complete (``os.replace``; atomic because both names lie
in one folder). On any error, the temporary file is removed and the target is left as it was.
Run folders rely on this: ``metrics.json`` lands last, atomically, and marks a finished run.

Layer 0: standard library only.

Usage::

    with atomic_path(out, overwrite=False) as tmp:   # FileExistsError now if ``out`` exists
        h5py.File(tmp, "w")...                       # write the whole file under ``tmp``
    # here ``out`` is complete; on an exception nothing is left behind

Writers that open the file in one call and finish it in another (a result file streamed tile by
tile) hold the :class:`AtomicPath` and call :meth:`AtomicPath.commit` or
:meth:`AtomicPath.abort` themselves.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def temp_name(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.<12 hex>.tmp`` in the same folder."""
    path = Path(path)
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(f"{path}: file exists; pass overwrite=True to replace it")


class AtomicPath:
    """A target file and the temporary name it is written under until :meth:`commit`.

    Args:
        path: the final file.
        overwrite: replace an existing ``path``; otherwise an existing ``path`` raises
            FileExistsError here and again at :meth:`commit` (a file that appeared meanwhile is
            never clobbered either).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError: the folder of ``path`` does not exist.
    """

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = True) -> None:
        self.path = Path(path)
        self.overwrite = bool(overwrite)
        if not self.overwrite and self.path.exists():
            raise _exists_error(self.path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path}: output folder {self.path.parent} does not exist")
        self.tmp = temp_name(self.path)

    def commit(self) -> Path:
        """Rename the finished temporary file onto the target; returns the target.

        The temporary file is gone afterwards, whether the rename worked or not.
        """
        try:
            if self.overwrite:
                os.replace(self.tmp, self.path)
            else:
                _rename_no_clobber(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        """Remove the temporary file (if any); the target is untouched."""
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _rename_no_clobber(tmp: Path, path: Path) -> None:
    """Give ``tmp``'s file the name ``path`` unless ``path`` exists (checked atomically where
    the file system has hard links: ``os.link`` refuses an existing name)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # no hard links here (some network or FUSE file systems)
        if path.exists():
            raise _exists_error(path) from None
        os.replace(tmp, path)


def atomic_path(path: str | os.PathLike[str], overwrite: bool = True) -> AtomicPath:
    """Context manager: yields the temporary name to write ``path`` under; on a clean exit the
    file is renamed onto ``path``, on an exception it is removed. See :class:`AtomicPath`."""
    return AtomicPath(path, overwrite)


def write_text_atomic(path: str | os.PathLike[str], text: str, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (creating its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text)
    return path


def write_json_atomic(path: str | os.PathLike[str], obj: Any, overwrite: bool = True) -> Path:
    """Write ``obj`` as JSON (indent 2, sorted keys, NaN allowed, final newline) to ``path``
    atomically (creating its folder); returns the path."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"
    return write_text_atomic(path, text, overwrite)


def commit_dir(tmp: str | os.PathLike[str], path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Rename the finished folder ``tmp`` (a chunked store written under :func:`temp_name`)
    onto ``path``; an existing ``path`` is refused (``tmp`` removed) unless ``overwrite``, then
    moved aside, replaced and removed."""
    import shutil

    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _exists_error(path)
        old = temp_name(path)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return path
