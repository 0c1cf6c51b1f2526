"""Pseudonyms: a keyed hash of `patient_id`, the only patient identifier outputs may carry.

The key never enters a config, log or cache listing: it comes from the environment variable
`OVCF_PSEUDONYM_KEY`, else from a key file created once with random bytes (keep it with the
project; another key gives other pseudonyms).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

ENV_KEY = "OVCF_PSEUDONYM_KEY"


def load_key(key_file: Path) -> bytes:
    """The project's key: from the environment, else from `key_file` (created when missing)."""
    if os.environ.get(ENV_KEY):
        return os.environ[ENV_KEY].encode()
    key_file = Path(key_file).expanduser()
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_hex(32))
        key_file.chmod(0o600)
    return key_file.read_text().strip().encode()


def pseudonym(patient_id: str, key: bytes) -> str:
    """Stable, non-reversible name for a patient, e.g. `p3fa9c2e1b04d`."""
    digest = hmac.new(key, patient_id.replace(" ", "").encode(), hashlib.sha256).hexdigest()
    return f"p{digest[:12]}"
