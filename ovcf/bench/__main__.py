"""`python -m ovcf.bench [NAME [options]]`: every benchmark in turn, with `make bench`'s settings, or one of them.

`ovcf bench` runs synth, ingest, training and segmenters (see `ovcf.bench`); `ovcf bench roi --help`
runs one benchmark with its own options, as `python -m ovcf.bench.roi --help` does.
"""

from __future__ import annotations

import sys

from ovcf.bench import ingest, roi, segmenters, synth, training

BENCHMARKS = {"synth": synth, "ingest": ingest, "training": training, "segmenters": segmenters, "roi": roi}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in BENCHMARKS:
        BENCHMARKS[argv[0]].main(argv[1:])
        return
    if argv:
        print(f"usage: ovcf bench [{' | '.join(BENCHMARKS)} [options]]; without a name: all but roi, as `make bench`")
        sys.exit(0 if argv[0] in ("-h", "--help") else 2)
    synth.main([])
    ingest.main([])
    training.main([])
    segmenters.main(["--precision", "fp32", "--steps", "5"])


if __name__ == "__main__":
    main()
