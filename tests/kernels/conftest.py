"""Kernel tests: make Triton's CPU interpreter usable with NumPy >= 2.4 (TRITON_INTERPRET=1 only).

The interpreter turns a scalar loop bound into a Python int with int(array); its scalars are
1-element arrays, which NumPy 2.4 refuses to convert. On the GPU nothing here applies.
"""
from indexcache.kernels.interpreter import patch_for_numpy2

patch_for_numpy2()
