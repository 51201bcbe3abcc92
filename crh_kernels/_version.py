"""The package version, in a leaf module so that any module can read it without importing the
public facade (``crh_kernels/__init__.py``, which imports nearly everything)."""
__version__ = "0.1.0"
