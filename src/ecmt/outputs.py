"""Output paths, checked before any work starts, and claimed for one run at a time.

:func:`claim` checks every output path of a command line (``--json FILE``, ``--out DIR``,
``-o FILE``) while nothing has been computed yet, and locks ``--out DIR`` for the run
(:func:`ecmt.progress.lock_directory`), so that a second run into the same directory is refused
instead of overwriting the first one's files. A write that still fails at the end (a full
disk) does not lose the results: :func:`results_or_stdout` prints them to stdout.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from .errors import OutputError
from .results import to_json

PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"))
"""Kernel interfaces, never results files."""


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def _check_creatable(path: Path, option: str) -> None:
    """``path`` does not exist; refuse unless a file can be created in the directory that will hold it."""
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise OutputError(f"{option} {path}: {base} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot write in {base} ({e.strerror or type(e).__name__})") from None


def _check_pseudo(path: Path, option: str) -> None:
    absolute = Path(os.path.abspath(path))  # links not resolved: /dev/stdout (-> /proc/self/fd/1) stays allowed
    if any(absolute == p or p in absolute.parents for p in PSEUDO_FILESYSTEMS):
        raise OutputError(f"{option} {path}: /{absolute.parts[1]} is a kernel interface, not a place for results")


def check_file(path: Path, option: str) -> None:
    """Refuse ``path`` as an output file unless it can be written."""
    _check_pseudo(path, option)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputError(f"{option} {path}: permission denied")
    else:
        _check_creatable(path, option)


def check_directory(path: Path, option: str) -> None:
    """Refuse ``path`` as an output directory unless files can be written in it."""
    _check_pseudo(path, option)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file; give a directory")
    if path.is_dir():
        _check_creatable(path / "results.json", option)
    else:
        _check_creatable(path, option)


@contextmanager
def claim(json_file: Optional[str] = None, out: Optional[str] = None, output: Optional[str] = None,
          lock: bool = True) -> Iterator[None]:
    """Check the output paths given, and hold ``out`` (if ``lock``) until the block ends.

    Raises:
        OutputError: A path that cannot be written, or ``out`` held by another run.
    """
    from .progress import lock_directory

    for path, option in ((json_file, "--json"), (output, "--output")):
        if path is not None:
            check_file(Path(path), option)
    with ExitStack() as stack:
        if out is not None:
            check_directory(Path(out), "--out")
            if lock:
                stack.enter_context(lock_directory(Path(out)))
        yield


def results_or_stdout(record: Mapping[str, Any], error: OSError) -> OutputError:
    """Print ``record`` as JSON to stdout, and the error to raise: where the results could not be written."""
    print(to_json(record), flush=True)
    where = error.filename or "an output file"
    return OutputError(f"could not write {where} ({error.strerror or error}); the results were printed "
                       "to stdout instead")
