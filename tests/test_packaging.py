"""The configs ship inside the wheel, so `python -m ovcf.train` works from a pip install too, and so
do the `ovcf` and `ovcf-<command>` scripts."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

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
