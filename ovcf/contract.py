"""The cohort contract's constants, shared by every reader and writer of a cohort.

Kept in one module so the synthetic generator and the reader cannot drift apart: see
``shared/cohort-format.md`` (reproduced in the README) for the contract itself.
"""

CLINICAL_CSV = "clinical.csv"
DICOM_DIR = "dicom"
MASKS_DIR = "masks"

REQUIRED_COLUMNS = ("patient_id", "center", "age", "sex", "dxa_t_score", "mri_date", "level", "label")
OPTIONAL_COLUMNS = ("ct_date", "etiology", "ct_series_uid")

LABELS = ("chronic", "acute")  # index 1 is the positive class: acute (bone-marrow oedema on MRI)
SEXES = ("F", "M")

# VerSe label ids of the vertebral levels (C1..C7 = 1..7, T1..T12 = 8..19, L1..L6 = 20..25, T13 = 28).
LEVEL_IDS = {
    **{f"C{i}": i for i in range(1, 8)},
    **{f"T{i}": 7 + i for i in range(1, 13)},
    **{f"L{i}": 19 + i for i in range(1, 7)},
    "T13": 28,
}

# Cranio-caudal order of the levels; T13 (when present) sits between T12 and L1.
LEVEL_ORDER = [*(f"C{i}" for i in range(1, 8)), *(f"T{i}" for i in range(1, 14)), *(f"L{i}" for i in range(1, 7))]

# Inclusion criteria of the protocol.
MIN_AGE = 50
MAX_CT_MRI_DAYS = 14
DEFAULT_ETIOLOGY = "osteoporotic"

# Plausible values of the CSV's numbers (inclusive): a value outside is a typing or unit error, not a patient,
# so its row is `invalid` rather than silently trained on. No one is older than 120 years (an age in months
# lands outside); measured DXA T-scores lie within about -6..+4, and -8..+6 leaves margin while catching a
# decimal point lost in the export (-29 for -2.9) or a BMD in mg/cm2.
AGE_RANGE = (0.0, 120.0)
T_SCORE_RANGE = (-8.0, 6.0)

# Stable exclusion codes (one per criterion) used in flow reports.
EXCLUSION_CODES = (
    "age",
    "etiology",
    "interval",
    "no_ct",
    "level_not_in_fov",
    "implant",
    "image_quality",
    "unreadable",
)
# Reasons a row cannot be used that are not protocol criteria but data problems.
DATA_PROBLEM_CODES = ("invalid", "no_mask", "mask_mismatch")

# Mask voxels must coincide with CT voxels within this distance (mm).
MASK_TOLERANCE_MM = 0.01

# The CT signs a fracture can show (acute: the first four; chronic: the last three), in the order of the
# classifier's sign heads and of every per-sign output. clinical.csv may carry them in the optional column
# `signs`: a row's sign names joined by ";" ("" = none of them, "?" = not read: the row has no sign labels).
# A cohort without the column has no sign labels at all.
SIGNS = (
    "fracture_lines",
    "impaction_band",
    "raised_attenuation",
    "soft_tissue_swelling",
    "sclerotic_margin",
    "vacuum_cleft",
    "osteophytes",
)
SIGNS_COLUMN = "signs"
SIGNS_UNKNOWN = "?"
SIGN_NAMES = {  # as a report names them
    "fracture_lines": "fracture line",
    "impaction_band": "impaction band",
    "raised_attenuation": "oedema-like attenuation",
    "soft_tissue_swelling": "paravertebral swelling",
    "sclerotic_margin": "sclerotic rim",
    "vacuum_cleft": "vacuum cleft",
    "osteophytes": "osteophytes",
}
