"""crh_kernels: fast covariance measurements for the Canonical Representation Hypothesis.

Public names only; no logic lives here.
"""
from ._version import __version__
from .backends import available_backends
from .collect import Collector
from .moments import CrossMoments, Moments, cross_moments, moments
from .report import Report

__all__ = ["Moments", "moments", "cross_moments", "CrossMoments", "Collector", "Report",
           "available_backends", "__version__"]
