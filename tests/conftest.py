"""Shared fixtures: a tiny generated cohort, config composition and CLI runs in a sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ovcf.cli import config_dir

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def compose_cfg(config_name: str = "train", overrides: list[str] | None = None, tmp: Path | None = None):
    """The composed config, with output folders under `tmp` (no Hydra run is active)."""
    extra = [f"paths.output_dir={tmp}", f"paths.cache_dir={tmp / 'cache'}", f"paths.data_dir={tmp / 'data'}"] if tmp else []
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name, overrides=[*(overrides or []), *extra])


def synthetic_params(name: str = "default", **override) -> dict:
    """Generator parameters of `conf/synthetic/<name>.yaml`, with overrides."""
    cfg = compose_cfg("train", [f"synthetic={name}"])
    params = OmegaConf.to_container(cfg.synthetic, resolve=True)
    params["plant"] = None  # tests plant problems where they check them
    params.update(override)
    return params


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """Four patients per center, five levels each; generated once per test session."""
    from ovcf.synth.cohort import generate_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    return generate_cohort(out, num_workers=2, progress=False, **synthetic_params(patients_per_center=4, n_levels=[5, 5]))


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict:
    """Environment for `python -m ovcf.*` runs: a shared test cache, W&B disabled."""
    root = tmp_path_factory.mktemp("cli")
    return {
        **os.environ,
        "WANDB_MODE": "disabled",
        "OVCF_CACHE_DIR": str(root / "cache"),
        "OVCF_DATA_DIR": str(root / "data"),
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, cli_env, tiny_cohort) -> Path:
    """A two-model smoke multirun on the tiny cohort (DenseNet-121 in 2.5D and 3D); trained once per session."""
    root = tmp_path_factory.mktemp("tiny_sweep")
    sweep = root / "sweep"
    args = [
        "-m",
        "model=densenet121,densenet121_3d",
        "debug=smoke",
        f"data.cohort={tiny_cohort}",
        "data.val_fraction=0.5",
        "data.roi_size=32",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_cli("ovcf.train", args, cli_env, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def run_cli(module: str, args: list[str], env: dict, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def fit_losses(net, image, label, steps: int, lr: float) -> list[float]:
    """DiceCE losses of `steps` Adam steps on one batch: does a segmenter learn at all?"""
    import torch
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
