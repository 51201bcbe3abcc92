"""Triton kernels only (no launch logic): see row_stats.py, syrk.py, cross.py.

Importing this package imports triton; set ``TRITON_INTERPRET=1`` before that to run the
kernels on CPU tensors.
"""
