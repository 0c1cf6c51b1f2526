"""SLURM through Hydra's submitit launcher: the sbatch script a sweep would submit (no cluster needed),
and, where `sinfo` answers (`.ci/slurm-up` starts a one-node SLURM on localhost), a real two-job sweep."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
from conftest import run_cli


def test_dry_run_prints_sbatch_parameters(cli_env, tmp_path):
    args = ["hydra.launcher.partition=gpu", "trainer=ddp", "hydra.launcher.timeout_min=90", f"hydra.sweep.dir={tmp_path}"]
    proc = run_cli("ovcf.slurm", args, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = proc.stdout
    for line in ("--partition=gpu", "--gpus-per-node=2", "--ntasks-per-node=2", "--time=90", "--nodes=1"):
        assert f"#SBATCH {line}\n" in script, script  # trainer=ddp: 2 devices, so 2 tasks and 2 GPUs per node
    assert f"{tmp_path}/.submitit/%j" in script and "srun" in script
    assert not list(tmp_path.iterdir())  # nothing submitted, nothing written


def test_dry_run_refuses_an_unknown_option(cli_env, tmp_path):
    proc = run_cli("ovcf.slurm", ["trainer=tpu"], cli_env, tmp_path)
    assert proc.returncode == 2 and "unknown trainer 'tpu'" in proc.stderr


def _slurm_partition(name: str = "debug") -> str | None:
    """None when `name` has an idle node, else why the real SLURM test cannot run."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client (sinfo, sbatch) on PATH: apt-get install slurm-wlm munge, then .ci/slurm-up as root"
    try:
        proc = subprocess.run(["sinfo", "-h", "-p", name, "-o", "%t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s: is slurmctld running? (.ci/slurm-up)"
    if proc.returncode != 0:
        return f"sinfo failed ({proc.stderr.strip() or proc.returncode}): start SLURM with .ci/slurm-up"
    states = proc.stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mix") for s in states):
        return f"partition {name} has no idle node (states: {states or 'none'}); .ci/slurm-up makes one"
    return None


def test_sweep_runs_as_slurm_jobs(tiny_cohort, cli_env, tmp_path):
    """Two smoke runs submitted as a SLURM job array by `hydra/launcher=slurm`; both write results.json."""
    reason = _slurm_partition("debug")
    if reason:
        pytest.skip(reason)
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.gpus_per_node=null",  # a CPU node
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=3",
        "hydra.launcher.timeout_min=10",
        "seed=0,1",
        "debug=smoke",
        f"data.cohort={tiny_cohort}",
        "data.val_fraction=0.5",
        "data.roi_size=32",
        f"hydra.sweep.dir={sweep}",
    ]
    start = time.time()
    proc = run_cli("ovcf.train", args, cli_env, tmp_path, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for job in ("0", "1"):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["seed"] == int(job) and 0.0 <= results["val"]["auroc"] <= 1.0
    job_ids = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert [i.split("_")[1] for i in job_ids] == ["0", "1"], job_ids  # one array task per run: <array id>_<run>
    assert all((sweep / ".submitit" / i / f"{i}_0_result.pkl").is_file() for i in job_ids)
    print(f"SLURM jobs {', '.join(job_ids)} finished in {time.time() - start:.0f} s")
