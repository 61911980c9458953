"""Triton's CPU interpreter (TRITON_INTERPRET=1) across the versions the project meets: the CI's Triton and the GPU
machines' Triton 3.6, under NumPy 2.4 and later.

Triton 3.6's interpreter holds a kernel's scalars as one-element arrays and turns them into Python ints with
`int(array)` when a loop takes them as bounds (`tl.range(lo, hi)`); NumPy 2.4 refuses `int()` of an array that is
not 0-dimensional, so every kernel whose loop bounds are computed fails there. Later Triton squeezes the array
first. `install()` makes 3.6's interpreter do the same; it touches nothing else and nothing a GPU run uses.
"""

import numpy as np


def _scalar_index(self):
    return int(np.asarray(self.handle.data).reshape(-1)[0])


def install() -> bool:
    """Patch the interpreter's tensor-as-index conversion where it still calls int() on a 1-element array; True
    when patched (idempotent; False where the interpreter needs nothing or cannot be imported)."""
    try:
        from triton.runtime import interpreter
    except ImportError:   # pragma: no cover - a Triton without the interpreter
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scalar_index_fixed", False):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)   # restored with the rest when the kernel ends

    patch_lang_tensor._scalar_index_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
