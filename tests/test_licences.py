"""What `pip install ovcf` brings carries no strong-copyleft licence.

ovcf is Apache-2.0. A required dependency under the GPL or AGPL would put whoever distributes an
installation under its terms (pylibjpeg-libjpeg, GPL-3.0, was one until issue 25). The top-level
requirements are read from the repository's pyproject.toml, which is what a fresh clone's CI
installs (the installed ovcf metadata may come from another checkout's editable install); their
dependencies come from the installed distributions' metadata, recursively, honouring environment
markers and the extras each requirement asks for. A licence is read from License-Expression
(PEP 639) where present, else from the Trove `License ::` classifiers and a one-line License field.
`pytest -s` prints the table.

Weak copyleft (LGPL, MPL, EPL, CDDL) and licences that are proprietary or not declared are
allowed only by name, with the reason, in the allow-lists below. A requirement that is not
installed is listed and cannot be checked here; pip installs it in CI, where it is checked.
"""

from __future__ import annotations

import re
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

STRONG_COPYLEFT = re.compile(r"\bA?GPL|(?<!Lesser )(?<!Library )General Public License|Affero", re.IGNORECASE)
WEAK_COPYLEFT = re.compile(
    r"LGPL|Lesser General Public|Library General Public|\bMPL\b|Mozilla Public|\bEPL\b|Eclipse Public|\bCDDL\b", re.IGNORECASE
)
PERMISSIVE = re.compile(
    r"\bMIT\b|\bBSD\b|0BSD|Apache|\bISC\b|\bPSF|Python Software Foundation|\bZlib\b|\bCC0|BSL-1\.0|Boost Software|HPND"
    r"|Unlicense|Public Domain",
    re.IGNORECASE,
)
# Weak copyleft, allowed by name: the code is used unmodified, and LGPL libraries are linked dynamically.
WEAK_ALLOWED = {
    "certifi": "MPL-2.0: Mozilla's CA bundle, used unmodified; MPL obligations attach only to modified files",
    "tqdm": "MPL-2.0 AND MIT: used unmodified; MPL obligations attach only to modified files",
}
PROPRIETARY = re.compile(r"Proprietary|LicenseRef-", re.IGNORECASE)
# Proprietary or undeclared, allowed by name (fnmatch patterns on canonical names).
OTHER_ALLOWED = {
    "nvidia-*": "NVIDIA's redistributable CUDA libraries (NVIDIA licence): torch's CUDA build on Linux pulls them",
    "cuda-toolkit": "NVIDIA CUDA Toolkit EULA, declared nowhere in its metadata: torch's CUDA build on Linux pulls it",
}
WANDB_PLOTS_NEED = {"numpy", "pandas", "scikit-learn", "scipy", "pillow"}  # wandb.plot.roc_curve, wandb.Image


def runtime_closure() -> tuple[dict[str, metadata.Distribution], set[str]]:
    """Installed distributions ovcf's pyproject requires at run time, directly or not; and those missing."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = [Requirement(text) for text in project["dependencies"]]
    pending = [r for r in pending if r.marker is None or r.marker.evaluate({"extra": ""})]
    found: dict[str, metadata.Distribution] = {}
    missing: set[str] = set()
    walked: set[tuple[str, str]] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        try:
            dist = found.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.add(name)
            continue
        found[name] = dist
        for extra in {"", *requirement.extras}:
            if (name, extra) in walked:
                continue
            walked.add((name, extra))
            for text in dist.requires or []:
                nested = Requirement(text)
                if nested.marker is None or nested.marker.evaluate({"extra": extra}):
                    pending.append(nested)
    return found, missing


def licence(dist: metadata.Distribution) -> str:
    """The declared licence: License-Expression, else `License ::` classifiers and a one-line License field."""
    meta = dist.metadata
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        return expression
    declared = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    field = (meta.get("License") or "").strip()
    if field and "\n" not in field and len(field) <= 100 and field.upper() != "UNKNOWN":
        declared.append(field)  # a long field is the licence's full text: its classifiers say what it is
    return "; ".join(d for d in declared if d != "OSI Approved")


def kind(text: str) -> str:
    """strong (GPL, AGPL), weak (LGPL, MPL ...), other (proprietary or undeclared) or permissive;
    the best of SPDX `OR` choices. Classifiers cannot say OR, so a proprietary one next to a
    permissive one (a dual licence, or an unclear one) counts as other."""
    order = ["permissive", "weak", "other", "strong"]

    def one(choice: str) -> str:
        if STRONG_COPYLEFT.search(choice):
            return "strong"
        if WEAK_COPYLEFT.search(choice):
            return "weak"
        return "permissive" if PERMISSIVE.search(choice) and not PROPRIETARY.search(choice) else "other"

    return min((one(choice) for choice in re.split(r"\s+OR\s+", text)), key=order.index)


def _allowed(name: str, allow: dict[str, str]) -> str | None:
    return next((why for pattern, why in allow.items() if fnmatch(name, pattern)), None)


def test_no_runtime_dependency_is_strong_copyleft():
    found, missing = runtime_closure()
    rows, strong, unexplained = [], [], []
    for name, dist in sorted(found.items()):
        text = licence(dist)
        verdict = kind(text)
        allow = {"weak": WEAK_ALLOWED, "other": OTHER_ALLOWED}.get(verdict)
        why = _allowed(name, allow) if allow is not None else None
        if verdict == "strong":
            strong.append(f"{name} ({text})")
        elif allow is not None and why is None:
            unexplained.append(f"{name}: {verdict} ({text or 'nothing declared'})")
        rows.append((name, dist.version, text or "-", verdict + (" - allowed: " + why if why else "")))
    print(f"\n{len(found)} runtime distributions (from {ROOT / 'pyproject.toml'}):")
    for row in rows:
        print(f"  {row[0]:40} {row[1]:17} {row[2][:60]:60} {row[3][:120]}")
    for name in sorted(missing):
        print(f"  {name:40} {'not installed':17} {'(unchecked)':60} -")
    assert not strong, f"strong copyleft in ovcf's runtime dependencies: {strong}"
    assert not unexplained, f"add each, with its reason, to WEAK_ALLOWED or OTHER_ALLOWED, or drop it: {unexplained}"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("GNU General Public License v3 (GPLv3); Other/Proprietary License", "strong"),  # pylibjpeg-libjpeg 2.5
        ("AGPL-3.0-only", "strong"),
        ("MIT AND GPL-2.0-or-later", "strong"),
        ("GNU Library or Lesser General Public License (LGPL)", "weak"),
        ("LGPL-2.1-or-later", "weak"),
        ("MPL-2.0 AND MIT", "weak"),
        ("GPL-2.0-or-later OR MIT", "permissive"),
        ("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", "permissive"),
        ("Apache-2.0 WITH LLVM-exception", "permissive"),
        ("LicenseRef-NVIDIA-Proprietary", "other"),
        ("Other/Proprietary License; Apache 2.0", "other"),
        ("", "other"),
    ],
)
def test_licence_kinds(text, expected):
    assert kind(text) == expected


def test_what_wandb_plots_need_is_a_runtime_dependency():
    """wandb.plot.roc_curve imports pandas, scikit-learn and scipy; a W&B run after fit crashed without pandas."""
    found, missing = runtime_closure()
    assert WANDB_PLOTS_NEED <= set(found) | missing
