"""Triton's CPU interpreter (TRITON_INTERPRET=1) across the versions the project meets: the CI's Triton and the GPU
machines' Triton 3.6, under NumPy 2.4 and later.

Triton 3.6's interpreter holds a kernel's scalars as one-element arrays and turns them into Python ints with
`int(array)` when a loop takes them as bounds (`tl.range(lo, hi)`); NumPy 2.4 refuses `int()` of an array that is
not 0-dimensional, so every kernel whose loop bounds are computed fails there. Later Triton squeezes the array
first. `install()` makes 3.6's interpreter do the same.

Every call of a @triton.jit helper from inside a kernel re-patches the whole triton.language namespace in the
interpreter (inspect.getmembers over tl, tl.tensor and tl.math, about 0.4 ms a call, a third of an attention
kernel's interpreted time), although the kernel's launch has patched it already and the helper's patch is never
undone (its scope is dropped: the launch's restore puts the originals back). `install()` skips that repeat while a
launch's patch is in place; a helper called outside a launch is patched as before.

Neither touches anything a GPU run uses.
"""

import numpy as np


def _scalar_index(self):
    return int(np.asarray(self.handle.data).reshape(-1)[0])


def install() -> bool:
    """Both fixes above where this Triton's interpreter has the functions they replace; True when anything was
    patched now (idempotent; False where there is nothing to do or no interpreter)."""
    try:
        from triton.runtime import interpreter
    except ImportError:   # pragma: no cover - a Triton without the interpreter
        return False
    return _install_scalar_index(interpreter) | _install_helper_calls_reuse_the_launch_patch(interpreter)


def _install_helper_calls_reuse_the_launch_patch(interpreter) -> bool:
    original = getattr(interpreter, "_patch_lang", None)
    scope_class = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_class is None or not hasattr(scope_class, "restore") \
            or getattr(original, "_reuses_launch_patch", False):
        return False
    import triton.language as tl

    lang_modules = (tl, tl.core)
    langs_of = {}     # fn -> the triton.language modules in its globals: what _patch_lang patches for it
    launch = []       # [the scope of the launch in progress, the set of modules patched since it began]

    def languages(fn):
        if fn not in langs_of:
            langs_of[fn] = frozenset(id(m) for m in fn.__globals__.values() if any(m is x for x in lang_modules))
        return langs_of[fn]

    def patch_lang(fn):
        if launch and languages(fn) <= launch[1]:   # a helper of a running kernel, its modules patched already
            return scope_class()                    # records nothing; its restore() does nothing
        scope = original(fn)
        if launch:                                  # a helper that sees a module the kernel does not (tl.core):
            launch[1] |= languages(fn)              # patched as before, once per launch
            return scope
        launch[:] = [scope, set(languages(fn))]
        restore = scope.restore

        def restore_and_end():
            launch.clear()
            restore()

        scope.restore = restore_and_end
        return scope

    patch_lang._reuses_launch_patch = True
    interpreter._patch_lang = patch_lang
    return True


def _install_scalar_index(interpreter) -> bool:
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scalar_index_fixed", False):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)   # restored with the rest when the kernel ends

    patch_lang_tensor._scalar_index_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
