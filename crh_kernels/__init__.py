"""crh_kernels: fast covariance measurements for the Canonical Representation Hypothesis.

Public names only; no logic lives here.
"""
from .backends import available_backends
from .moments import CrossMoments, Moments, cross_moments, moments

__version__ = "0.1.0"

__all__ = ["Moments", "moments", "cross_moments", "CrossMoments", "available_backends", "__version__"]
