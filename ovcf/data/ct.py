"""The one CT path: scan headers, choose and load the CT series with fallback, check each level.

Ingest, segment and predict read a patient's CT only through this module, so a series that one of
them accepts the others accept too, they fall back to the same second series, and they refuse with
the same reason (`no_ct`, `unreadable`, `mask_mismatch`, `image_quality`). The per-level checks
(field of view, cement or metal, noise) and the ROI cut are the same for a cohort row and for a
new patient's level.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ovcf.contract import LEVEL_IDS, LEVEL_ORDER
from ovcf.data.dicom import find_files, read_header
from ovcf.data.quality import (
    QualityChecks,
    cortex_hu,
    doubling,
    implant_measures,
    implant_note,
    is_implant,
    locate_level,
    noise_hu,
    streak_hu,
)
from ovcf.data.roi import RoiSpec, check_box, cut_roi
from ovcf.data.series import Series, SeriesChecks, SeriesError, ct_candidates, group_series, load_series
from ovcf.data.volume import Volume, load_nifti, mask_on_ct
from ovcf.errors import CohortError, ConfigError
from ovcf.parallel import pool_map

NIFTI = (".nii", ".nii.gz")
# Series report statuses besides the `SERIES_PROBLEMS` codes (and mask_mismatch) of rejected series.
USED, NOT_CANDIDATE, UNUSED = "used", "not a candidate", "candidate, not used"


@dataclass(frozen=True)
class IngestChecks:
    """Series validation and CT-based exclusion thresholds (the `ingest` config group)."""

    series: SeriesChecks = field(default_factory=SeriesChecks)
    quality: QualityChecks = field(default_factory=QualityChecks)

    @classmethod
    def from_config(cls, cfg: dict | None) -> IngestChecks:
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"series", "quality"}
        if unknown:
            raise CohortError(f"ingest config has unknown section(s) {', '.join(sorted(unknown))}; use series and quality")
        try:
            return cls(SeriesChecks(**(cfg.get("series") or {})), QualityChecks(**(cfg.get("quality") or {})))
        except TypeError as exc:
            raise CohortError(f"ingest config: {exc}; see conf/ingest/default.yaml for the known keys") from exc


# --- scanning an export ------------------------------------------------------------------------


@dataclass
class Scan:
    """Every file's header of a folder, read once: the series of each patient and what the files were.

    `kinds` counts the files by `FILE_KINDS`, and the entries skipped unread (`broken_link`, see `find_files`).
    """

    files: list[str]
    kinds: Counter
    series: list[Series]

    def by_patient(self) -> dict[str, list[Series]]:
        out: dict[str, list[Series]] = {}
        for s in self.series:
            out.setdefault(s.patient_id, []).append(s)
        return out


def _read_headers(paths: list[str]) -> tuple[list, Counter, list[str]]:
    slices, kinds, unreadable = [], Counter(), []
    for p in paths:
        found, kind = read_header(p)
        slices.extend(found)
        kinds[kind] += 1
        if kind == "unreadable":
            unreadable.append(p)
    return slices, kinds, unreadable


def scan_folder(folder: Path, num_workers: int = 1, progress: bool = True, pool=None) -> Scan:
    """Reads the header of every file under `folder` (any nesting), in chunks on `num_workers` processes.

    A damaged file has no readable series UID, so each series learns how many unreadable files lie in
    the folders of its slices: a gap they explain is reported as `unreadable_files`, not `missing_slices`.
    """
    files, skipped = find_files(folder)
    chunks = [files[i : i + 64] for i in range(0, len(files), 64)]
    scanned = pool_map(_read_headers, chunks, num_workers, "Reading DICOM headers", progress, pool)
    series = group_series([h for hs, _, _ in scanned for h in hs])
    lost = Counter(os.path.dirname(p) for _, _, unreadable in scanned for p in unreadable)
    if lost:
        for s in series:
            s.unreadable = sum(lost[f] for f in {os.path.dirname(h.path) for h in s.slices})
    return Scan(files, sum((k for _, k, _ in scanned), skipped), series)


@dataclass
class Case:
    """One patient of an input folder: its DICOM series (grouped by PatientID), or one NIfTI CT."""

    patient_id: str
    series: list[Series] = field(default_factory=list)
    nifti: Path | None = None

    def scrub(self, text: str, name: str) -> str:
        """`text` without the input's file paths or the original patient ID (they can identify the patient)."""
        for s in self.series:
            for h in s.slices:
                text = text.replace(h.path, "<file>")
        return text.replace(self.patient_id, name) if self.patient_id else text


def find_cases(path: Path, option: str = "input", num_workers: int = 1, progress: bool = True) -> list[Case]:
    """The patients of a DICOM folder (one patient, or an export of many) or of a NIfTI CT file.

    NIfTI files found in a folder are cases of their own, named by their file stem; `option` names
    the setting in error messages.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{option}={path}: no such file or folder (give a DICOM folder, an export of many patients, or a NIfTI CT)"
        )
    if path.is_file():
        if not path.name.endswith(NIFTI):
            raise ConfigError(f"{option}={path}: give a NIfTI CT (.nii, .nii.gz) or a folder of DICOM files")
        return [Case(_stem(path), nifti=path)]
    scan = scan_folder(path, num_workers, progress)
    cases = [Case(pid, series) for pid, series in sorted(scan.by_patient().items())]
    cases += [Case(_stem(Path(f)), nifti=Path(f)) for f in scan.files if f.endswith(NIFTI)]
    if not cases:
        raise ConfigError(f"{option}={path}: no DICOM images and no NIfTI CT among its {len(scan.files)} files")
    return cases


def _stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


# --- choosing and loading the CT ---------------------------------------------------------------


@dataclass
class CtChoice:
    """The CT chosen for one patient, or why there is none.

    Attributes:
        series: the series used (None: every candidate failed, or the CT is a NIfTI file).
        volume: the CT as read, in the series' own voxel order (`canonical()` for RAS).
        labels: the mask on the canonical CT's voxels, when a mask was given.
        report: one `{"series", "status", "notes"}` per series of the patient.
        notes: reader notes of the chosen series (`code: text`), and `series_fallback` when the preferred one failed.
        reason: `no_ct`, `unreadable` or `mask_mismatch` when nothing was chosen.
        message: what went wrong, scrubbed of paths and IDs.
    """

    series: Series | None = None
    volume: Volume | None = None
    labels: np.ndarray | None = None
    report: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reason: str | None = None
    message: str = ""

    def refuse(self, name: str) -> None:
        """Raises the refusal of a patient named `name` in one line (after a failed choice)."""
        raise CohortError(f"{name}: refused ({self.reason}): {self.message}")


def choose_ct(
    series: list[Series],
    checks: SeriesChecks,
    named: str | None = None,
    mask: Volume | None = None,
    scrub: Callable[[str], str] = str,
    mask_name: str = "mask",
) -> CtChoice:
    """The first CT candidate (in the contract's order of preference) that loads and, with a mask, carries it.

    A mask is drawn on one series: if the preferred series is unreadable, a second one (e.g. a thick
    recon) is used only when the mask fits it too.

    Args:
        series: every series of one patient.
        checks: series validation tolerances.
        named: the `ct_series_uid` of the clinical CSV, when it names one.
        mask: the patient's label map, to be carried onto the chosen CT's voxels.
        scrub: removes paths and IDs from a message.
        mask_name: how messages name the mask.
    """
    choice = CtChoice()
    candidates = ct_candidates(series, named)
    choice.report = [{"series": s.name, "status": NOT_CANDIDATE, "notes": s.notes} for s in series if s not in candidates]
    if not candidates:
        found = ", ".join(s.name for s in series) or "none"
        what = "the series named in ct_series_uid is not in the export" if named else "no axial CT series in the export"
        choice.reason, choice.message = "no_ct", f"{what} (series found: {found})"
        return choice
    problems, mismatches = [], []
    for s in candidates:
        try:
            volume = load_series(s, checks)
            labels = None if mask is None else mask_on_ct(mask, volume, mask_name)
        except SeriesError as exc:
            choice.report.append({"series": s.name, "status": exc.code, "notes": [*s.notes, scrub(str(exc))]})
            problems.append(f"{exc.code}: {scrub(str(exc))}")
            continue
        except CohortError as exc:  # the mask does not lie on this series
            choice.report.append({"series": s.name, "status": "mask_mismatch", "notes": [*s.notes, scrub(str(exc))]})
            mismatches.append(scrub(str(exc)))
            continue
        choice.report.append({"series": s.name, "status": USED, "notes": s.notes})
        choice.report += [{"series": o.name, "status": UNUSED, "notes": o.notes} for o in candidates[candidates.index(s) + 1 :]]
        choice.series, choice.volume, choice.labels = s, volume, labels
        choice.notes = list(s.notes)
        if problems or mismatches:
            choice.notes.append("series_fallback: preferred series rejected: " + " | ".join(problems + mismatches))
        return choice
    if problems:
        choice.reason, choice.message = "unreadable", "no usable CT series: " + " | ".join(problems + mismatches)
    else:
        choice.reason, choice.message = "mask_mismatch", " | ".join(mismatches)
    return choice


def load_nifti_ct(path: Path, name: str) -> Volume:
    """A CT stored as NIfTI, or `CohortError` naming the patient when it cannot be one."""
    try:
        volume = load_nifti(path)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
        raise CohortError(f"{name}: refused (unreadable): the NIfTI CT cannot be read ({type(exc).__name__})") from exc
    if volume.array.ndim != 3:
        raise CohortError(f"{name}: refused (unreadable): the NIfTI CT has {volume.array.ndim} dimensions, not 3")
    return volume


def load_case(case: Case, checks: IngestChecks, name: str) -> CtChoice:
    """The CT of one input case chosen as ingest chooses it, or `CohortError` with ingest's reason."""
    if case.nifti is not None:
        return CtChoice(volume=load_nifti_ct(case.nifti, name))
    choice = choose_ct(case.series, checks.series, scrub=lambda text: case.scrub(text, name))
    if choice.volume is None:
        choice.refuse(name)
    return choice


def read_ct(path: Path, checks: IngestChecks, option: str = "image") -> CtChoice:
    """One patient's CT from a NIfTI file or a DICOM folder, chosen and validated as ingest does."""
    cases = find_cases(path, option, progress=False)
    if len(cases) != 1:
        raise ConfigError(f"{option}={path} holds {len(cases)} patients or CT files; pass one patient's folder or file")
    return load_case(cases[0], checks, Path(path).name)


# --- checks on the loaded CT -------------------------------------------------------------------


def slice_problem(volume: Volume, quality: QualityChecks) -> str | None:
    """Why the whole CT cannot show a fracture line (slices too far apart), or None."""
    slice_mm = float(volume.spacing.max())
    if slice_mm > quality.max_slice_mm:
        return f"voxels {slice_mm:.1f} mm apart exceed {quality.max_slice_mm:g} mm"
    return None


VERSE_OTHER_IDS = (26, 27)  # sacrum and coccyx: VerSe ids of no level, allowed beside the levels


def mask_problem(by_id: dict[int, np.ndarray]) -> str | None:
    """Why a mask cannot locate any level (empty, or labels that are not VerSe level ids), or None.

    Such a mask is a data problem (`mask_mismatch`); read as it is, every level would seem to lie
    outside the CT (`level_not_in_fov`, a protocol exclusion), or a foreign numbering would put a
    level on the wrong body (another tool's label 28 is not T13).
    """
    fix = "label each vertebral body with its VerSe id (C1-C7 1-7, T1-T12 8-19, L1-L6 20-25, T13 28)"
    if not by_id:
        return f"the mask is empty (all zeros); {fix}"
    levels = set(LEVEL_IDS.values())
    foreign = sorted(set(by_id) - levels - set(VERSE_OTHER_IDS))
    if not foreign and set(by_id) & levels:
        return None
    shown = foreign or sorted(by_id)
    listed = ", ".join(map(str, shown[:8])) + (", ..." if len(shown) > 8 else "")
    return f"mask labels {listed} are not VerSe level ids; {fix}"


@dataclass
class LevelCheck:
    """The protocol's CT-based checks of one level: where its body is, and what excludes or flags it.

    `reasons` are exclusion codes (level_not_in_fov, implant, image_quality) or the data problem
    mask_mismatch, `flags` what a reader should know (level_mask_missing: ROI centred on the
    estimate), and `notes` say each in words, in order.
    """

    level: str
    voxels: np.ndarray | None = None
    centre: np.ndarray | None = None
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    qc: dict = field(default_factory=dict)

    def add(self, reason: str, note: str) -> None:
        self.reasons.append(reason)
        self.notes.append(note)

    def flag(self, flag: str, note: str) -> None:
        self.flags.append(flag)
        self.notes.append(note)

    def cut(self, volume: Volume, roi: RoiSpec) -> tuple[np.ndarray, np.ndarray]:
        """The level's ROI (HU, int16) and body mask; records the cube's spacing in `qc["roi_mm"]`."""
        image, mask, spacing = cut_roi(volume, self.voxels, self.centre, roi)
        self.qc["roi_mm"] = round(spacing, 4)
        return image, mask


class SpineQc:
    """What every level of one scan shares, measured once per patient however many levels are checked:
    whether the mask can locate levels at all, the scan's cortical bone and the levels holding cement or metal."""

    def __init__(self, volume: Volume, by_id: dict[int, np.ndarray], quality: QualityChecks):
        self.volume, self.by_id, self.quality = volume, by_id, quality

    @cached_property
    def mask_problem(self) -> str | None:
        return mask_problem(self.by_id)

    @cached_property
    def cortex(self) -> float | None:
        return cortex_hu(self.volume, self.by_id)

    @cached_property
    def implant_levels(self) -> list[str]:
        """The mask's levels with cement or metal in or next to their body, cranial first.

        Metal far from the spine (a hip prosthesis in an abdominal CT) is no level's and excludes nothing.
        """
        found = []
        for name in LEVEL_ORDER:
            voxels = self.by_id.get(LEVEL_IDS[name])
            if voxels is not None and is_implant(implant_measures(self.volume, voxels, self.cortex, self.quality), self.quality):
                found.append(name)
        return found


def check_level(
    volume: Volume, by_id: dict[int, np.ndarray], level: str, quality: QualityChecks, spine: SpineQc | None = None
) -> LevelCheck:
    """Field of view, cement or metal, noise, motion, streaks and slice distance of `level` on the canonical CT `volume`.

    A mask that cannot locate any level (`mask_problem`) gives `mask_mismatch` and no centre. With
    `quality.implant_scope` "patient", cement or metal at any level of the mask excludes the level
    too (the protocol's "presence of foreign materials" is the patient's), with a note naming where
    it was found. Streaks are not counted against a level that holds metal: they are its. Pass one
    `spine` for all the levels of a scan so its shared measures are made once.
    """
    spine = spine or SpineQc(volume, by_id, quality)
    check = LevelCheck(level)
    if spine.mask_problem:
        check.add("mask_mismatch", spine.mask_problem)
        return check
    check.voxels, check.centre = locate_level(by_id, volume, level)
    if check.centre is None:
        check.add("level_not_in_fov", f"level {level} is outside the CT's field of view")
        return check
    if check.voxels is None:  # in view, but the mask lacks it: ROI centred on the estimate
        check.flag("level_mask_missing", f"level {level} is in view but not in the mask; ROI centred on its estimated position")
    box = check_box(check.voxels, check.centre, volume)
    implant = implant_measures(volume, box, spine.cortex, quality, in_body=check.voxels is not None)
    noise, ghost, streaks = noise_hu(volume, box, quality), doubling(volume, box, quality), streak_hu(volume, box, quality)
    check.qc = {
        **implant,
        "noise_hu": round(noise, 1),
        "doubling": round(ghost, 3),
        "streak_hu": round(streaks, 1),
        "slice_mm": round(float(volume.spacing.max()), 2),
    }
    if is_implant(implant, quality):
        check.add("implant", implant_note(implant, level, quality))
    elif quality.implant_scope == "patient":
        found = spine.implant_levels
        check.qc["implant_levels"] = found
        if found:
            check.add("implant", f"cement or metal at {', '.join(found)} of this patient (ingest.quality.implant_scope=patient)")
    if noise > quality.max_noise_hu:
        check.add("image_quality", f"soft-tissue noise {noise:.0f} HU exceeds {quality.max_noise_hu:g} HU")
    if ghost > quality.max_doubling:
        check.add("image_quality", f"edges doubled a few mm away (motion): score {ghost:.2f} exceeds {quality.max_doubling:g}")
    if streaks > quality.max_streak_hu and "implant" not in check.reasons:
        note = f"streaks of {streaks:.0f} HU across the soft tissue exceed {quality.max_streak_hu:g} HU (motion or metal)"
        check.add("image_quality", note)
    problem = slice_problem(volume, quality)
    if problem:
        check.add("image_quality", problem)
    return check
