"""The configs ship inside the wheel, so `python -m ovcf.train` works from a pip install too, and so
do the `ovcf` and `ovcf-<command>` scripts."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_configs(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("ovcf-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert {"ovcf/" + name for name in shipped} <= names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True)
    probe = "import ovcf.cli, pathlib; d = pathlib.Path(ovcf.cli.config_dir()); print(d, (d / 'train.yaml').is_file())"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(site)}
    )
    assert out.stdout.split() == [str(site / "ovcf" / "conf"), "True"], out.stderr[-2000:]

    scripts = {p.name for p in (site / "bin").iterdir()}
    assert {"ovcf", "ovcf-train", "ovcf-sign-ablation", "ovcf-bench"} <= scripts, sorted(scripts)
    env = {"PYTHONPATH": str(site)}
    listing = subprocess.run([str(site / "bin" / "ovcf"), "--help"], capture_output=True, text=True, env=env)
    assert listing.returncode == 0 and "sign-ablation" in listing.stdout, listing.stderr[-2000:]
    slurm = subprocess.run([str(site / "bin" / "ovcf"), "slurm", "--help"], capture_output=True, text=True, env=env)
    assert slurm.returncode == 0 and "sbatch script" in slurm.stdout, slurm.stderr[-2000:]


def _tested_versions() -> dict[str, str]:
    """`constraints.txt`: the exact versions CI installs (`make setup`) and the test suite runs on."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_floor_is_a_version_ci_tests():
    """A floor below what CI installs promises a version nobody ran: each requirement's `>=` floor is the
    version pinned in constraints.txt (regenerate both with `make lock` after an upgrade)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    tested = _tested_versions()
    wrong = []
    for text in requirements:
        req = Requirement(text)
        floors = [spec.version for spec in req.specifier if spec.operator == ">="]
        pinned = tested.get(canonicalize_name(req.name))
        if len(floors) != 1 or pinned is None or floors[0] != pinned:
            wrong.append(f"{req.name}: floor {floors or 'none'}, CI tests {pinned or 'nothing'}")
    assert wrong == []
