"""Triton's CPU interpreter (TRITON_INTERPRET=1) made usable for the kernel tests and the bench smoke run. On the
GPU nothing here applies.

- NumPy >= 2.4: the interpreter turns a scalar loop bound into a Python int with int(array), and its scalars
  are 1-element arrays, which NumPy 2.4 refuses to convert: its tensors get an __index__.
- fp32 -> e4m3 casts: the interpreter's own conversion rounds by adding one to the truncated mantissa without
  carrying into the exponent, so a value just below a power of two comes out as half of it (1.9967 -> 1.0,
  seen with Triton 3.6), and it rounds ties up instead of to even. The GPU's cvt rounds to nearest even;
  casts to float8 are done here by torch's conversion, which does too.
"""
import os

_patched = False


def patch_for_numpy2() -> None:
    """Patch the interpreter as the module docstring says (idempotent; a no-op unless TRITON_INTERPRET=1)."""
    global _patched
    if _patched or os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import torch
    from triton.runtime import interpreter as _interp

    original = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

    torch_fp8 = {"fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}
    original_fp_to_fp = _interp.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        if getattr(dst, "name", None) in torch_fp8 and getattr(src.dtype.scalar, "name", None) == "fp32":
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            data = values.to(torch_fp8[dst.name]).view(torch.uint8).numpy()
            return _interp.TensorHandle(data, dst)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    _interp.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp
    _patched = True
