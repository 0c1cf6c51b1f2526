"""`python -m ovcf.bench.synth`: how long the default synthetic cohort takes to generate, and how hard it is.

Generates a cohort with the default parameters and `--patients` patients (half per center) into a
fresh folder, times it, and prints the difficulty report's baseline AUCs next to the target
(generation under 3 minutes for 40 patients on 2 cores). The results are also written to
`<out>/bench_synth.json`; the exit code is 0 whatever they are, as a benchmark reports and does
not gate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

from ovcf.bench.ingest import synthetic_params
from ovcf.cli import setup_logging
from ovcf.synth.cohort import difficulty_summary, generate_cohort

log = logging.getLogger(__name__)

TARGET_S = 180.0
TARGET_PATIENTS = 40


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=TARGET_PATIENTS, help="patients in all (half per center)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering patients")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OVCF_DATA_DIR", "data")) / "bench-synth")
    args = parser.parse_args(argv)
    setup_logging()  # a benchmark is a command Hydra does not start: its console is set up here

    cohort = args.out / "cohort"
    if cohort.exists():
        shutil.rmtree(cohort)
    params = synthetic_params(args.patients)
    start = time.perf_counter()
    generate_cohort(cohort, num_workers=args.workers, progress=True, **params)
    seconds = time.perf_counter() - start
    report = json.loads((cohort / "difficulty.json").read_text())
    patients = 2 * params["patients_per_center"]
    result = {
        "patients": patients,
        "workers": args.workers,
        "seconds": round(seconds, 1),
        "seconds_per_patient": round(seconds / patients, 2),
        "target_s": TARGET_S * patients / TARGET_PATIENTS,
        "baseline_cv_auc": report["cv_auc"],
        "baseline_external_auc": report["external_auc"],
        "fractures": report["fractures"],
    }
    log.info(
        f"\nGenerated {patients} patients with {args.workers} workers in {seconds:.1f} s "
        f"({seconds / patients:.2f} s/patient; target {result['target_s']:.0f} s)"
    )
    log.info(difficulty_summary(cohort))
    (args.out / "bench_synth.json").write_text(json.dumps(result, indent=1))
    log.info(f"Results: {(args.out / 'bench_synth.json').resolve()}")
    return result


if __name__ == "__main__":
    main()
