"""`python -m ovcf.predict input=DICOM_DIR output=OUT_DIR`: the exported system applied to new patients' CT.

`input` is one patient's DICOM export, a whole export folder holding many patients (grouped by
PatientID), or a NIfTI CT. Each patient's CT series is chosen and validated by the same code as
cohort ingest (a series ingest would reject is refused with its reason; with many patients the
others still run), its vertebral bodies are segmented by the system's segmenter, and every
fractured level (named by `levels=[L1,T12]`; `levels=auto`: every body whose height loss reaches
Genant grade 1; `levels=all`: every body found) is cropped as in training and classified. Written
per patient, under its pseudonym only (`<output>/<pseudonym>/`): `report.json` (per level: acute
probability, the decision at the system's frozen threshold, heights and their ratios, protocol
flags), a Grad-CAM overlay per level, and optionally `mask.nii.gz` (`nifti=true`), `seg.dcm`
(`dicom_seg=true`, a DICOM SEG on the source CT series, `seg_type=labelmap` or `binary`) and `sr.dcm`
(`dicom_sr=true`, a DICOM SR measurement report of the levels referencing that SEG, which it writes too);
both carry, under `seg_mode=research` (the default), the pseudonym and new UIDs; under `seg_mode=pacs`, the
patient's identity and the CT's study, for a PACS.
`<output>/summary.csv` and `summary.json` list every patient.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ovcf.cli import device, hydra_main
from ovcf.data.ct import find_cases
from ovcf.data.pseudonym import load_key
from ovcf.errors import ConfigError
from ovcf.inference.dicom import check_seg_mode, check_seg_type
from ovcf.inference.patient import choose_levels, predict_cases
from ovcf.inference.system import latest_system, load_system


def _levels_option(levels):
    if isinstance(levels, (ListConfig, list, tuple)):
        return [str(v) for v in (OmegaConf.to_container(levels) if isinstance(levels, ListConfig) else levels)]
    return str(levels)


def run(cfg: DictConfig) -> dict:
    if not cfg.input or not cfg.output:
        raise ConfigError("pass input=DICOM_DIR (one patient, a whole export, or a NIfTI CT) and output=OUT_DIR")
    levels = _levels_option(cfg.levels)
    choose_levels(levels, {})  # a bad level name, SEG mode or SEG type fails before any work
    check_seg_mode(cfg.seg_mode)
    check_seg_type(cfg.seg_type)
    folder = Path(cfg.system).expanduser() if cfg.system else latest_system(Path(cfg.paths.log_dir))
    system = load_system(folder, device(cfg.device))
    cases = find_cases(Path(cfg.input), "input", cfg.workers, cfg.progress)
    out = Path(cfg.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    clinical = {k: v for k, v in OmegaConf.to_container(cfg.clinical).items() if v is not None}
    key = load_key(cfg.paths.key_file, cfg.paths.cache_dir)
    options = {k: cfg[k] for k in ("nifti", "dicom_seg", "dicom_sr", "seg_mode", "seg_type")}
    return predict_cases(cases, key, system, out, levels, clinical, cfg.progress, **options)


main = hydra_main("predict", run)

if __name__ == "__main__":
    main()
