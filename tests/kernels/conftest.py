"""Kernel tests: make Triton's CPU interpreter usable with NumPy >= 2.4 (TRITON_INTERPRET=1 only).

The interpreter turns a scalar loop bound into a Python int with int(array); its scalars are
1-element arrays, which NumPy 2.4 refuses to convert. On the GPU nothing here applies.
"""
import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter as _interp

    _orig_patch_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
