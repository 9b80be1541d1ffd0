"""Exceptions with messages meant for users: each names the file, line or model involved."""


class DiftSfmError(Exception):
    """Base class of every error dift-sfm raises on purpose."""


class ImageReadError(DiftSfmError):
    """An image file is missing, unreadable, truncated, or unusable for the conf."""


class FormatError(DiftSfmError):
    """A features/matches/pairs file is malformed or does not fit the request."""


class ModelLoadError(DiftSfmError):
    """Model weights could not be found or loaded (offline, wrong id or path)."""


class PartialFailure(DiftSfmError):
    """Some items failed while the others were processed and written."""

    def __init__(self, message: str, failures: dict[str, str]):
        super().__init__(message)
        self.failures = failures
