"""Triton's CPU interpreter as kernels/interpreter_compat.py leaves it: a helper called from a running kernel reuses
the launch's patch of triton.language (patched once per launch, not once per call), helpers that see triton.language
.core (the standard library's zeros_like) still get it patched, the originals are back after the launch, and the
results are those of the unpatched interpreter."""

import pytest
import torch
import triton
import triton.language as tl

from attnlrp_fast.kernels import interpreter_compat, interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="the interpreter runs with TRITON_INTERPRET=1")


@triton.jit
def _scaled(x, factor):
    return x * factor


@triton.jit
def _zeros_plus(x):
    return tl.zeros_like(x) + x          # triton.language.standard: its globals hold triton.language.core


@triton.jit
def _kernel(X, Y, N, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + offs, mask=ok, other=0.0)
    acc = _zeros_plus(x)
    for i in range(STEPS):
        acc = _scaled(acc, 2.0) - x
    tl.store(Y + offs, acc, mask=ok)


def _run(n=37, block=16, steps=5):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    y = torch.empty_like(x)
    _kernel[(triton.cdiv(n, block),)](x, y, n, BLOCK=block, STEPS=steps)
    expected = x.double()
    for _ in range(steps):
        expected = expected * 2 - x.double()
    return y, expected


def test_install_is_idempotent_and_in_place():
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "_reuses_launch_patch", False)
    assert interpreter_compat.install() is False   # done when attnlrp_fast.kernels was imported


def test_helpers_reuse_the_launch_patch_and_compute_the_same(monkeypatch):
    """Triton's _patch_lang patches through _patch_builtin (3 or 4 namespaces a call). 3 programs x 7 helper calls
    (_zeros_plus, zeros_like, _scaled x 5) re-patched the language 21 times before; now the launch patches it, and
    zeros_like (whose globals hold triton.language.core, which the kernel's do not) once more."""
    from triton.runtime import interpreter

    namespaces = []
    real = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda pkg, *a: (namespaces.append(pkg), real(pkg, *a))[1])
    load_before = tl.load
    y, expected = _run()
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    # the launch's 4 namespaces and 3 for zeros_like's, give or take a helper of the standard library: far from one
    # patch per call (3 programs x 7 calls x 3-4 namespaces, over 60; 109 measured without the compat layer)
    assert 0 < len(namespaces) <= 16, len(namespaces)
    assert tl.load is load_before          # the launch's restore put the originals back


def test_a_second_launch_patches_again():
    y1, e1 = _run(n=20, block=8, steps=2)
    y2, e2 = _run(n=45, block=32, steps=3)
    torch.testing.assert_close(y1.double(), e1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y2.double(), e2, rtol=1e-6, atol=1e-6)
