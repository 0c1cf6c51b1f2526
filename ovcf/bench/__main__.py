"""`python -m ovcf.bench`: every benchmark in turn, with `make bench`'s settings (see `ovcf.bench`)."""

from ovcf.bench import ingest, segmenters, synth, training

if __name__ == "__main__":
    synth.main([])
    ingest.main([])
    training.main([])
    segmenters.main(["--precision", "fp32", "--steps", "5"])
