"""Benchmarks (`make bench`): they report speed and never gate a test.

- `python -m ovcf.bench.synth`: generation time and baseline AUC of a 40-patient default cohort;
- `python -m ovcf.bench.ingest`: ingest slices/s, cold and cached, next to SimpleITK;
- `python -m ovcf.bench.training`: training samples/s of the pipeline next to a bare PyTorch loop;
- `python -m ovcf.bench.segmenters`: training-step throughput of the three segmenters, fp32 and bf16.

`python -m ovcf.bench` runs all four in that order with `make bench`'s settings.
"""
