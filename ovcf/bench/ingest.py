"""`python -m ovcf.bench.ingest`: cohort ingest throughput vs reading the same series with SimpleITK.

Three timings on one synthetic cohort (generated on first use, then reused):

- cold ingest: `ovcf.data.ingest.ingest` into an empty cache (headers, series choice, volumes,
  masks, ROI crops, flow report);
- cached re-open: the same call again (it only checks the fingerprint) plus `read_index`, which is
  what every training run pays;
- SimpleITK: `ImageSeriesReader` on every series folder, to numpy, the usual baseline for
  "read a DICOM series into an array".

Both paths get the same cores (`--workers` processes for ingest, as many SimpleITK threads), and
the files are read once beforehand so that neither pays for a cold disk. The results are printed
as a table and written to `<out>/bench_ingest.json`; the exit code is 0 whatever they are, as a
benchmark reports and does not gate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ovcf.cli import config_dir, setup_logging
from ovcf.contract import DICOM_DIR
from ovcf.data.dicom import list_files
from ovcf.data.ingest import ingest, read_index
from ovcf.data.roi import RoiSpec
from ovcf.synth.cohort import generate_cohort

log = logging.getLogger(__name__)

REOPEN_TARGET_S = 5.0  # cached re-open, for the 40-patient cohort
REOPEN_TARGET_PATIENTS = 40


def default_out() -> Path:
    """`$OVCF_DATA_DIR/bench-ingest`, as generated cohorts live under the data folder (`conf/paths`)."""
    return Path(os.environ.get("OVCF_DATA_DIR", "data")) / "bench-ingest"


def train_config():
    """The default `ovcf.train` config, composed as `tests/conftest.py` does: the cohort and ROI a run uses."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train")


def synthetic_params(patients: int) -> dict:
    """The default synthetic config with `patients // 2` per center."""
    params = OmegaConf.to_container(train_config().synthetic, resolve=True)
    params["patients_per_center"] = max(1, patients // 2)
    return params


def ensure_cohort(out: Path, patients: int, workers: int) -> Path:
    """The cohort under `<out>/cohort`, generated only when missing or made with other parameters.

    Generation takes longer than the benchmark itself, so a matching cohort is reused.
    """
    cohort = out / "cohort"
    params = synthetic_params(patients)
    truth = cohort / "synth.json"
    if truth.exists():
        made_with = json.loads(truth.read_text()).get("parameters")
        if made_with == json.loads(json.dumps(params, default=float)):
            return cohort
        log.info(f"{cohort} was generated with other parameters; regenerating")
        shutil.rmtree(cohort)
    return generate_cohort(cohort, num_workers=workers, progress=True, **params)


def warm_page_cache(files: list[str]) -> None:
    """Reads every file once, so the first timed path does not also pay for the disk."""
    for path in files:
        with open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass


def series_folders(dicom: Path) -> list[str]:
    """The folders under `dicom` that directly hold files (one series each in the contract's layout)."""
    return sorted(folder for folder, _, names in os.walk(dicom) if names)


def time_ingest(cohort: Path, cache_root: Path, workers: int) -> tuple[float, float, float, Path]:
    """Seconds for a cold ingest, for the same call again (cache fresh) and for `read_index`; and the cache."""
    data = train_config().data  # the default run's ROI and whole-CT volumes
    roi = RoiSpec.from_settings(data, data.volume_spacing)
    kwargs = {"cache_root": cache_root / "cache", "roi": roi, "key_file": cache_root / "key", "num_workers": workers}
    start = time.perf_counter()
    cache = ingest(cohort, progress=True, **kwargs)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    again = ingest(cohort, progress=False, **kwargs)
    reopen = time.perf_counter() - start
    start = time.perf_counter()
    read_index(again)
    index = time.perf_counter() - start
    return cold, reopen, index, cache


def time_simpleitk(folders: list[str], workers: int) -> tuple[float, int]:
    """Seconds to read every series folder into numpy with SimpleITK on `workers` threads, and the slices read.

    Folders holding no readable series (e.g. only non-DICOM files) are skipped, as a user would.
    """
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(workers)
    slices = 0
    start = time.perf_counter()
    for folder in folders:
        reader = sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(folder)
        if not ids:
            continue
        names = reader.GetGDCMSeriesFileNames(folder, ids[0])
        reader.SetFileNames(names)
        sitk.GetArrayFromImage(reader.Execute())
        slices += len(names)
    return time.perf_counter() - start, slices


def report(results: dict) -> str:
    """The markdown table and the PASS/FAIL line of each target."""
    n, cold, sitk_s = results["slices"], results["cold_ingest_s"], results["simpleitk_s"]
    reopen = results["reopen_s"] + results["read_index_s"]
    ratio = results["ratio_cold_to_simpleitk"]
    lines = [
        "| path | seconds | slices/s | ratio to SimpleITK |",
        "|---|---:|---:|---:|",
        f"| ovcf ingest, cold | {cold:.2f} | {n / cold:.0f} | {ratio:.2f} |",
        f"| SimpleITK ImageSeriesReader + numpy | {sitk_s:.2f} | {results['simpleitk_slices'] / sitk_s:.0f} | 1.00 |",
        f"| ovcf cached re-open (ingest + read_index) | {reopen:.3f} | | |",
        "",
        f"{'PASS' if ratio >= 1.0 else 'FAIL'}  cold ingest >= SimpleITK (ratio {ratio:.2f}, target >= 1.0)",
        f"{'PASS' if reopen < REOPEN_TARGET_S else 'FAIL'}  cached re-open {reopen:.3f} s for {results['patients']} patients "
        f"(target < {REOPEN_TARGET_S:.0f} s for {REOPEN_TARGET_PATIENTS})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=REOPEN_TARGET_PATIENTS, help="cohort size (half per center)")
    parser.add_argument("--workers", type=int, default=2, help="ingest processes, and SimpleITK threads")
    parser.add_argument("--out", type=Path, default=None, help="cohort and results folder (default $OVCF_DATA_DIR/bench-ingest)")
    parser.add_argument("--keep", action="store_true", help="keep the cache written by the cold ingest")
    args = parser.parse_args(argv)
    setup_logging()  # a benchmark is a command Hydra does not start: its console is set up here
    out = (args.out or default_out()).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    cohort = ensure_cohort(out, args.patients, args.workers)
    files = list_files(cohort / DICOM_DIR)
    warm_page_cache(files)
    patients = len(json.loads((cohort / "synth.json").read_text())["patients"])

    cache_root = Path(tempfile.mkdtemp(prefix="cache-", dir=out))
    try:
        cold, reopen, index, cache = time_ingest(cohort, cache_root, args.workers)
        sitk_s, sitk_slices = time_simpleitk(series_folders(cohort / DICOM_DIR), args.workers)
    finally:
        if not args.keep:
            shutil.rmtree(cache_root, ignore_errors=True)

    results = {
        "patients": patients,
        "slices": len(files),
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "cold_ingest_s": cold,
        "reopen_s": reopen,
        "read_index_s": index,
        "simpleitk_s": sitk_s,
        "simpleitk_slices": sitk_slices,
        "ratio_cold_to_simpleitk": sitk_s / cold,  # ours/sitk in throughput: >= 1 means ingest is as fast
        "cache": str(cache) if args.keep else None,
    }
    (out / "bench_ingest.json").write_text(json.dumps(results, indent=1))
    log.info(f"{patients} patients, {len(files)} slices, {args.workers} workers ({os.cpu_count()} CPUs), cohort {cohort}")
    log.info(report(results))
    if args.keep:
        log.info(f"cache kept in {cache}")


if __name__ == "__main__":
    main()
