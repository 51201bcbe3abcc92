"""crh_kernels: fast covariance measurements for the Canonical Representation Hypothesis.

Public names only; no logic lives here.
"""
from .backends import available_backends
from .collect import Collector
from .moments import CrossMoments, Moments, cross_moments, moments
from .report import Report

__version__ = "0.1.0"

__all__ = ["Moments", "moments", "cross_moments", "CrossMoments", "Collector", "Report",
           "available_backends", "__version__"]
