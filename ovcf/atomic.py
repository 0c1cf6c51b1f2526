"""Cache and report files are written whole or not at all.

A crash, or a parallel sweep job writing the same file, must never leave a half-written index,
sample or report behind: each write goes to a temporary sibling (unique per process) that is then
renamed over the target in one step. A writer that fails leaves the previous file as it was.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Calls `write(tmp)` on a temporary sibling of `path`, then renames it to `path`.

    The temporary file is removed when `write` fails, so that an interrupted write leaves only the
    previous version of `path` (if any).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)` (UTF-8), whole or not at all."""
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, data, indent: int = 1) -> None:
    """`data` as JSON (values JSON cannot hold as their `str`), whole or not at all."""
    write_text(path, json.dumps(data, indent=indent, default=str))


def write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str], **options) -> None:
    """`rows` as CSV with a header of `columns`, whole or not at all.

    Args:
        path: the file to (re)place.
        rows: one dict per line.
        columns: the header, in order.
        **options: passed to `csv.DictWriter` (e.g. `restval=""`, `extrasaction="ignore"`).
    """

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), **options)
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)


def exclusive(path: Path):
    """A lock on `path` (a folder or file another process may be writing) for the processes of this
    machine, as a context manager: the study runs a sweep's trainings side by side, and the first of them
    builds the shared cohort and cache while the others wait, then reuse it."""
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{path}.lock")
