"""What every `python -m ovcf.X` entry point shares: where the configs are, and one-line errors.

Hydra reports an unknown config option (`model=foo`) with a long listing and a traceback hint,
and wraps errors raised inside `instantiate`; users get instead one line that names the problem
and the fix, and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from ovcf.errors import OvcfError


def config_dir() -> str:
    """`ovcf/conf` inside an installed wheel, else the checkout's top-level `conf/`."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_overrides(argv: list[str]) -> None:
    """Exits with one line if a `group=option` override names an option that does not exist."""
    root = Path(config_dir())
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        group, value = arg.split("=", 1)
        group = group.lstrip("+~")
        if "@" in group or "." in group or group.startswith("hydra") or not (root / group).is_dir():
            continue
        if any(token in value for token in ("(", "[", "*", "$")) or value in ("", "null"):
            continue  # sweep syntax or interpolation: let Hydra handle it
        options = sorted(p.stem for p in (root / group).glob("*.yaml"))
        for option in value.split(","):
            if option.strip() not in options:
                fail(f"unknown {group} '{option.strip()}' in {arg}; choose one of: {', '.join(options)}")


def guarded(fn: Callable, *args, **kwargs):
    """Runs `fn`, turning an `OvcfError` (also when wrapped by Hydra's instantiate) into one line."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a user error
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OvcfError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        fail(str(cause))
