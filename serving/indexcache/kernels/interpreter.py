"""Triton's CPU interpreter (TRITON_INTERPRET=1) with NumPy >= 2.4, for the kernel tests and the bench
smoke run: the interpreter turns a scalar loop bound into a Python int with int(array), and its scalars are
1-element arrays, which NumPy 2.4 refuses to convert. On the GPU nothing here applies."""
import os

_patched = False


def patch_for_numpy2() -> None:
    """Give the interpreter's tensors an __index__ (idempotent; a no-op unless TRITON_INTERPRET=1)."""
    global _patched
    if _patched or os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter as _interp

    original = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
    _patched = True
