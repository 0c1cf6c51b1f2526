"""Pseudonyms: a keyed hash of `patient_id`, the only patient identifier outputs may carry.

The key never enters a config, log or cache listing: it comes from the environment variable
`OVCF_PSEUDONYM_KEY`, else from a key file created once with random bytes (keep it; another key
gives other pseudonyms). The key file lives in the user's config folder, apart from the cache it
protects: whoever gets a copy of the cache must not get the key to re-identify its patients.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ovcf.errors import ConfigError

ENV_KEY = "OVCF_PSEUDONYM_KEY"


def default_key_file() -> Path:
    """`$XDG_CONFIG_HOME/ovcf/pseudonym.key`, else `~/.config/ovcf/pseudonym.key` (as `conf/paths/default.yaml`)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser() / "ovcf" / "pseudonym.key"


def load_key(key_file: str | Path | None = None, cache_dir: str | Path | None = None) -> bytes:
    """The project's key: from the environment, else from `key_file` (None: `default_key_file()`), created when missing.

    Args:
        key_file: the key file (`paths.key_file`).
        cache_dir: the cache the pseudonyms protect (`paths.cache_dir`): a key file inside it is refused.
    """
    if os.environ.get(ENV_KEY):
        return os.environ[ENV_KEY].encode()
    key_file = Path(key_file).expanduser() if key_file else default_key_file()
    if cache_dir is not None and key_file.resolve().is_relative_to(Path(cache_dir).expanduser().resolve()):
        raise ConfigError(
            "paths.key_file lies inside the cache it protects (paths.cache_dir): move the key file out of the cache "
            "and set paths.key_file (or OVCF_KEY_FILE) to it; the default is ~/.config/ovcf/pseudonym.key"
        )
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}.tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, key_file)  # never over a key that a run started alongside created first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return key_file.read_text().strip().encode()


def pseudonym(patient_id: str, key: bytes) -> str:
    """Stable, non-reversible name for a patient, e.g. `p3fa9c2e1b04d`."""
    digest = hmac.new(key, patient_id.replace(" ", "").encode(), hashlib.sha256).hexdigest()
    return f"p{digest[:12]}"
