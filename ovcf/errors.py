"""User-facing errors: each carries one message that names the file or field and the fix.

Entry points print these as a single line instead of a traceback.
"""


class OvcfError(Exception):
    """A problem the user can fix (bad path, bad file, bad option)."""


class CohortError(OvcfError):
    """A cohort (folder, CSV, DICOM or mask) that does not follow the cohort format."""


class ConfigError(OvcfError):
    """A configuration value that names something that does not exist."""
