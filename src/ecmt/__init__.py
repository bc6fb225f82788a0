"""ecmt: convert pretrained Transformers into multi-threshold spiking neural networks.

Implements ECMT (Huang et al., ACM MM 2024): Expectation Compensation modules for the
nonlinear layers and Multi-Threshold neurons for spike communication.

Example:
    >>> import ecmt
    >>> thresholds = ecmt.calibrate(model, batches, percentile=99.0)   # doctest: +SKIP
    >>> snn = ecmt.convert(model, thresholds, levels=8)                # doctest: +SKIP
    >>> out = ecmt.simulate(snn, x, T=16)                              # doctest: +SKIP
"""
from .calibration import ActivationStats, calibrate, collect_statistics
from .compensation import ExpectationCompensation, MatMulEC
from .conversion import SpikingModel, build_spiking, convert, site_names
from .errors import (CalibrationError, CheckpointError, ConversionError, DatasetError, IncompatibleFileError,
                     InvalidFileError, InvalidInputError, OutputError, ResumeError, ThresholdError,
                     UnsupportedModelError)
from .neurons import MTNeuron, SpikeRule
from .simulation import simulate, simulate_steps
from .state import reset_net
from .thresholds import Thresholds
from .tuning import tune

__version__ = "0.1.0"

__all__ = [
    "ActivationStats", "CalibrationError", "CheckpointError", "ConversionError", "DatasetError",
    "ExpectationCompensation", "IncompatibleFileError", "InvalidFileError", "InvalidInputError", "MTNeuron",
    "MatMulEC", "OutputError", "ResumeError", "SpikeRule", "SpikingModel", "ThresholdError", "Thresholds",
    "UnsupportedModelError", "build_spiking", "calibrate",
    "collect_statistics", "convert", "reset_net", "simulate", "simulate_steps", "site_names", "tune",
]
