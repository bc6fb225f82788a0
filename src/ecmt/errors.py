"""The exception hierarchy of ecmt.

Every problem that ecmt detects in its input raises a subclass of :class:`ConversionError`,
so callers can catch one type. The command line turns these into one-line messages.
"""


class ConversionError(Exception):
    """Base class of every error ecmt raises on bad input or unsupported models."""


class UnsupportedModelError(ConversionError):
    """The model contains modules the converter cannot turn into spiking form."""


class CalibrationError(ConversionError):
    """Calibration could not produce thresholds (empty data, NaN/Inf activations, ...)."""


class ThresholdError(ConversionError):
    """Thresholds are missing for a site, or are not valid numbers."""


class InvalidInputError(ConversionError, ValueError):
    """An input tensor or argument is malformed (NaN/Inf values, T <= 0, ...)."""


class CheckpointError(ConversionError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit the model."""


class DatasetError(ConversionError):
    """A dataset is missing, empty, or does not fit the model."""


class IncompatibleFileError(ConversionError):
    """A saved SNN was written by an incompatible version of ecmt."""


class ResumeError(ConversionError):
    """An interrupted evaluation cannot be resumed: no progress file, or one of another run."""


class InvalidFileError(CheckpointError):
    """A saved SNN file's metadata does not fit the schema, or its data do not match its digest."""


class OutputError(ConversionError):
    """An output path cannot be written (a directory where a file is wanted, no permission, ...),
    or another run holds the output directory."""
