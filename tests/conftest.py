"""Shared fixtures: a tiny generated cohort, config composition and CLI runs in a sandbox."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ovcf.cli import ConsoleHandler, config_dir, setup_logging
from ovcf.data.pseudonym import load_key

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
TOTALSEG = REAL / "totalsegmentator" / "tests" / "reference_files"
EXAMPLE_CT = TOTALSEG / "example_ct.nii.gz"  # a real abdominal CT, T11 to the pelvis, 3 mm
EXAMPLE_BODIES = TOTALSEG / "spine_report" / "test_result" / "totalseg_vertebrae_pp_refined.nii.gz"  # its T12-L5 bodies
needs_example_ct = pytest.mark.skipif(not EXAMPLE_CT.exists(), reason="real CT not in ../shared/data/real")


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


def build_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name`, built by `build(folder)` once per test run and shared by every xdist worker.

    Whichever worker asks first builds it under a file lock; the others wait, then reuse it. So the
    session's cohort and smoke study are made once however pytest spreads the tests over workers
    (no reliance on `--dist loadgroup`). A build that failed, or was cut off, is redone by the next
    worker that asks (and fails there too, with its own message).
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder under xdist
    folder = shared / name
    with FileLock(f"{folder}.lock"):
        if not (shared / f"{name}.built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            (shared / f"{name}.built").touch()
    return folder


def pytest_collection_modifyitems(items):
    """Longest first: the `slow(seconds=N)` tests start before the rest, in falling order (the others
    keep theirs), so the short tests fill in at the end and the workers finish together.

    pytest-xdist's `--dist load` starts each worker on two consecutive tests, and the second waits
    behind the first. So the head of the list is dealt longest first into those pairs, each test to
    the pair with the least work so far: with two workers the four longest run as (1st, 4th) and
    (2nd, 3rd), not (1st, 2nd) on one worker while the other finishes early. N is measured on 2 CPU
    cores; it orders, it never fails."""

    def seconds(item) -> float:
        mark = item.get_closest_marker("slow")
        return float(mark.kwargs.get("seconds", 60)) if mark else 0.0

    items.sort(key=seconds, reverse=True)  # stable: ties keep file order
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and len(items) >= 2 * workers:
        pairs: list[list] = [[] for _ in range(workers)]
        for item in items[: 2 * workers]:
            pair = min((p for p in pairs if len(p) < 2), key=lambda p: sum(map(seconds, p)))
            pair.append(item)
        items[: 2 * workers] = [item for pair in pairs for item in pair]


@pytest.fixture(autouse=True)
def console():
    """The console every command sets up (`ovcf.cli.setup_logging`): a test that calls a command's
    function directly reads its messages on stdout, as a user of the command would."""
    root = logging.getLogger()
    level = root.level
    setup_logging()
    yield
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def private_key_folder(tmp_path_factory):
    """Pseudonym keys of the tests go to a temporary config folder, never to the user's ~/.config or key."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
        mp.delenv("OVCF_KEY_FILE", raising=False)
        mp.delenv("OVCF_PSEUDONYM_KEY", raising=False)
        yield


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """Four patients per center, five levels each; generated once per test session."""
    from ovcf.synth.cohort import generate_cohort

    def build(out: Path) -> None:
        generate_cohort(out, num_workers=2, progress=False, **synthetic_params(patients_per_center=4, n_levels=[5, 5]))

    return build_once(tmp_path_factory, "tiny_cohort", build)


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory, private_key_folder) -> dict:
    """Environment for `python -m ovcf.*` runs: a shared test cache and pseudonym key, W&B disabled."""
    root = build_once(tmp_path_factory, "cli", lambda root: load_key(root / "pseudonym.key"))  # one key for all workers
    return {
        **os.environ,
        "WANDB_MODE": "disabled",
        "OVCF_CACHE_DIR": str(root / "cache"),
        "OVCF_KEY_FILE": str(root / "pseudonym.key"),
        "OVCF_DATA_DIR": str(root / "data"),
        "PYTHONUNBUFFERED": "1",
    }


# Identifiers planted in every file of `phi_cohort`: nothing the pipeline writes may contain them.
SECRETS = {
    "name": "ZYXWVUTPHI",
    "given name": "QWERTYPHI",
    "birth date": "19230405",
    "birth date (ISO)": "1923-04-05",
    "accession": "ACCPHI99117",
    "institution": "PHIVILLE XQ HOSPITAL",
    "physician": "DRPHIDOCTOR",
    "address": "12 PHILANE",
}


def plant_phi(src: Path, dst: Path) -> dict[str, str]:
    """Copies a cohort with distinctive identifiers in the CSV, every DICOM header and the file and
    folder names; returns the planted values by what they are (patient IDs included)."""
    import csv
    import shutil

    import pydicom

    shutil.copytree(src, dst)
    with open(dst / "clinical.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = {old: f"MRNPHI{7731 + i}" for i, old in enumerate(dict.fromkeys(r["patient_id"] for r in rows))}
    for r in rows:
        r["patient_id"] = ids[r["patient_id"]]
        r["patient_name"] = f"{SECRETS['name']}^{SECRETS['given name']}"
        r["birth_date"] = SECRETS["birth date (ISO)"]
    with open(dst / "clinical.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for old, new in ids.items():
        os.replace(dst / "masks" / f"{old}.nii.gz", dst / "masks" / f"{new}.nii.gz")
    for folder in sorted(p for p in (dst / "dicom").iterdir() if p.is_dir()):
        new_id = None
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            ds = pydicom.dcmread(path)
            new_id = ids[str(ds.PatientID)]
            ds.PatientID = new_id
            ds.PatientName = f"{SECRETS['name']}^{SECRETS['given name']}"
            ds.PatientBirthDate = SECRETS["birth date"]
            ds.AccessionNumber = SECRETS["accession"]
            ds.InstitutionName = SECRETS["institution"]
            ds.ReferringPhysicianName = ds.PerformingPhysicianName = SECRETS["physician"]
            ds.PatientAddress = SECRETS["address"]
            ds.save_as(path)
        os.replace(folder, folder.parent / f"{new_id}_{SECRETS['name']}")  # PACS folders named after the patient
    return {**SECRETS, **{f"patient ID {i}": new for i, new in enumerate(ids.values())}}


@pytest.fixture(scope="session")
def phi_cohort(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny cohort with PHI planted everywhere (see `plant_phi`), and the planted values.

    It is the smoke study's cohort, and the study's segmenter trains for one epoch on two scans: enough
    to find bodies in one look, not in four. So its patients are drawn in the classic style alone (the
    tiny cohort mixes them all); segmenting every style is the full study's job, not a smoke test's."""
    import json

    from ovcf.synth.cohort import generate_cohort

    def build(folder: Path) -> None:
        params = synthetic_params(patients_per_center=4, n_levels=[5, 5], style_mix=["classic"])
        generate_cohort(folder / "source", num_workers=2, progress=False, **params)
        (folder / "secrets.json").write_text(json.dumps(plant_phi(folder / "source", folder / "export")))

    folder = build_once(tmp_path_factory, "phi", build)
    return folder / "export", json.loads((folder / "secrets.json").read_text())


STUDY_MODELS = {"segmenters": ["unet", "unetr_pp"], "classifiers": ["densenet121", "densenet121_3d"]}


def study_args(cohort: Path, out: Path) -> list[str]:
    """`ovcf.study` at smoke settings on `cohort`: two segmenters, two classifiers (3 epochs, so a run
    can be cut off mid-way), W&B offline for the classifiers, the external report with Grad-CAM.

    The classifiers read the cohort's own masks (`data.roi_source=given`): a segmenter trained for
    one epoch on two scans cannot count levels, and ROIs from its masks would exclude every row.
    The predicted-mask path is tested in test_segment.py. With `../shared`, each segmenter is also checked on
    TotalSegmentator's example_ct (`check_ct`), as a user adds a labelled real CT."""
    seg = ["model.patch_size=[32,32,32]"]
    if EXAMPLE_CT.exists():
        seg.append(f"check_ct=[{{image:{EXAMPLE_CT},reference:{EXAMPLE_BODIES}}}]")
    return [
        "debug=smoke",
        f"out={out}",
        f"study.segmenters=[{','.join(STUDY_MODELS['segmenters'])}]",
        f"study.classifiers=[{','.join(STUDY_MODELS['classifiers'])}]",
        f'overrides=["data.cohort={cohort}","data.val_fraction=0.5","data.progress=false"]',
        "segmentation_overrides=[" + ",".join(f'"{o}"' for o in seg) + "]",
        'classification_overrides=["data.roi_source=given","data.roi_size=32","trainer.max_epochs=3","logger=wandb"]',
        'evaluate_overrides=["threshold.rule=fixed","gradcam_cases=1","progress=false"]',
    ]


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory, cli_env, phi_cohort):
    """The whole study (`python -m ovcf.study`) on the PHI-planted tiny cohort, run once per session:
    the segmenter sweep, predicted masks, the classifier sweep, the external report and the system.
    Tests of each stage read its folder; the privacy test searches all of it."""
    from types import SimpleNamespace

    def env(root: Path) -> dict:
        return {**cli_env, "WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb")}

    def build(root: Path) -> None:
        proc = run_cli("ovcf.study", study_args(phi_cohort[0], root / "study"), env(root), root, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (root / "output.txt").write_text(proc.stdout + proc.stderr)

    root = build_once(tmp_path_factory, "study", build)
    output = (root / "output.txt").read_text()
    return SimpleNamespace(folder=root / "study", root=root, env=env(root), output=output, secrets=phi_cohort[1])


@pytest.fixture(scope="session")
def tiny_sweep(smoke_study) -> Path:
    """The study's classifier sweep: DenseNet-121 in 2.5D (run 0) and 3D (run 1), smoke settings."""
    return smoke_study.folder / "classification"


def check_heights_flag_fractures(mask: Path, fractured: set[str]) -> dict:
    """`levels=auto` (Genant grade >= 1 from the mask's heights) picks every fractured body of `mask`;
    it picks no other, except that on slices over 2 mm a normal body may cross the 20% bound by the
    one slice its heights are quantized to. Returns the heights."""
    import nibabel as nib
    import numpy as np

    from ovcf.data.heights import level_heights
    from ovcf.inference.patient import choose_levels

    img = nib.as_closest_canonical(nib.load(mask))
    slice_mm = float(img.header.get_zooms()[2])
    heights = level_heights(np.asarray(img.dataobj).astype(np.int16), img.header.get_zooms())
    flagged = set(choose_levels("auto", heights))
    assert fractured <= flagged, (mask.name, fractured - flagged, heights)
    for level in flagged - fractured:
        h = heights[level]
        assert slice_mm > 2.0 and h["height_loss"] < 0.2 + slice_mm / h["posterior_mm"], (mask.name, level, slice_mm, h)
    return heights


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
