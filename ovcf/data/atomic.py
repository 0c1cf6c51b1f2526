"""Cache and report files are written whole or not at all.

A crash, or a parallel sweep job writing the same file, must never leave a half-written index,
sample or report behind: each write goes to a temporary sibling (unique per process) that is then
renamed over the target in one step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Calls `write(tmp)` on a temporary sibling of `path`, then renames it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data, indent: int = 1) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=indent, default=str)))
