"""RMSNorm, LayerNorm, GLU products and activations: the Triton kernels (interpreter on CPU) and the torch path
against the float64 dense references in both modes (exact gradients and the LRP rules), the rules' conservation
properties, strided inputs, argument errors and torch.compile."""

import zlib

import pytest
import torch

from attnlrp_fast.bindings import activation, layer_norm, rms_norm
from attnlrp_fast.bindings import glu_product as glu
from attnlrp_fast.bindings import dispatch as bindings_dispatch
from attnlrp_fast.bindings.glu import activation_fwd_op, glu_fwd_op
from attnlrp_fast.bindings.norm import layer_norm_fwd_op, rms_norm_fwd_op
from attnlrp_fast.kernels import glu as triton_glu
from attnlrp_fast.kernels import interpreting
from attnlrp_fast.kernels import norm as triton_norm
from attnlrp_fast.reference import (ACTIVATION_RATIO_AT_ZERO, activation_dense, glu_dense, layer_norm_dense,
                                    rms_norm_dense)
from helpers import TOL, rel_err

# Under the interpreter sigmoid(2 u) for gelu_tanh at very negative x evaluates exp(+88...) = inf in numpy, which
# warns; 1 / (1 + inf) = 0 is the right value (and what the GPU computes).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

BACKENDS = [pytest.param("triton", marks=needs_interpreter), "torch"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
MODES = [pytest.param(False, id="grad"), pytest.param(True, id="lrp")]
ACTS = ["silu", "gelu", "gelu_tanh", "tanh", "relu"]
GLU_ACTS = ["silu", "gelu", "gelu_tanh"]
EPS = 1e-5


def _gen(*key):
    """A generator seeded from the test's parameters (crc32: the same seed in every process)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, g, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=g) * scale + shift).to(dtype)


def _leaf(t):
    """A copy of t with t's strides (clone() would make a view with gaps, e.g. a slice of rows, contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t).requires_grad_()


def _run(fn, inputs, dout):
    """Output of fn(*inputs) and the gradient of every tensor input for the upstream gradient dout; the
    inputs keep their strides."""
    leaves = [None if t is None else _leaf(t) for t in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _check(fn, ref_fn, inputs, dout, tol, what, out_dtype=None):
    """fn against ref_fn run in float64 on the same (rounded) inputs: output (of dtype out_dtype, default the
    first input's) and every gradient (each in its input's dtype)."""
    out, grads = _run(fn, inputs, dout)
    ref, ref_grads = _run(ref_fn, [None if t is None else t.double() for t in inputs], dout.double())
    assert out.shape == ref.shape and out.dtype == (out_dtype or inputs[0].dtype)
    for t, gr in zip(inputs, grads):
        assert (t is None) == (gr is None)
        assert t is None or gr.dtype == t.dtype
    errs = {"out": rel_err(out, ref)}
    errs.update({f"grad{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(grads, ref_grads)) if a is not None})
    bad = {k: e for k, e in errs.items() if not e < tol}
    assert not bad, f"{what}: relative errors over {tol}: {bad}"
    return out, grads


# ---- against the float64 references ----

def every_mode_dtype_backend(test):
    for name, values in (("lrp", MODES), ("dtype", DTYPES), ("backend", BACKENDS)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def _norm(kind, lrp, backend, offset=0.0):
    """(op, float64 reference) for kind "rms" | "ln", both taking (x, weight, bias); RMSNorm ignores the bias."""
    if kind == "rms":
        return (lambda x, w, b: rms_norm(x, w, EPS, offset=offset, lrp=lrp, backend=backend),
                lambda x, w, b: rms_norm_dense(x, w, EPS, offset=offset, lrp=lrp))
    return (lambda x, w, b: layer_norm(x, w, b, EPS, lrp=lrp, backend=backend),
            lambda x, w, b: layer_norm_dense(x, w, b, EPS, lrp=lrp))


# name: (kind, x shape, weight?, bias?, offset)
NORM_CASES = {
    "rms_llama": ("rms", (37, 100), True, False, 0.0),
    "rms_gemma_3d": ("rms", (2, 19, 96), True, False, 1.0),
    "rms_no_weight": ("rms", (37, 100), False, False, 0.0),
    "ln_affine": ("ln", (37, 100), True, True, 0.0),
    "ln_affine_3d": ("ln", (2, 19, 96), True, True, 0.0),
    "ln_weight_only": ("ln", (37, 100), True, False, 0.0),
    "ln_no_affine": ("ln", (2, 19, 96), False, False, 0.0),
}


@every_mode_dtype_backend
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_norm_matches_reference(case, lrp, dtype, backend):
    kind, shape, has_w, has_b, offset = NORM_CASES[case]
    g = _gen("norm", case, lrp)
    x = _randn(shape, g, dtype, scale=2.0, shift=0.5)
    w = _randn(shape[-1:], g, dtype, scale=0.3, shift=1.0 - offset) if has_w else None
    b = _randn(shape[-1:], g, dtype, scale=0.5) if has_b else None
    _check(*_norm(kind, lrp, backend, offset), [x, w, b], _randn(shape, g, dtype), TOL[dtype], case)


@every_mode_dtype_backend
@pytest.mark.parametrize("act", GLU_ACTS)
def test_glu_matches_reference(act, lrp, dtype, backend):
    g = _gen("glu", act, lrp)
    gate, up, dout = (_randn((2, 19, 100), g, dtype, scale=2.0) for _ in range(3))
    _check(lambda a, b: glu(a, b, act=act, lrp=lrp, backend=backend),
           lambda a, b: glu_dense(a, b, act=act, lrp=lrp), [gate, up], dout, TOL[dtype], f"glu {act}")


@every_mode_dtype_backend
@pytest.mark.parametrize("act", ACTS)
def test_activation_matches_reference(act, lrp, dtype, backend):
    g = _gen("act", act, lrp)
    x, dy = _randn((37, 100), g, dtype, scale=2.5), _randn((37, 100), g, dtype)
    _check(lambda x: activation(x, act=act, lrp=lrp, backend=backend),
           lambda x: activation_dense(x, act=act, lrp=lrp), [x], dy, TOL[dtype], f"act {act}")


@pytest.mark.parametrize("lrp", MODES)
def test_float64_takes_the_torch_path(lrp):
    g = _gen("fp64", lrp)
    x, w, b, dy = (_randn(s, g, torch.float64) for s in ((3, 7, 24), (24,), (24,), (3, 7, 24)))
    tol = TOL[torch.float64]
    _check(*_norm("rms", lrp, None, offset=1.0), [x, w, None], dy, tol, "rms")
    _check(*_norm("ln", lrp, None), [x, w, b], dy, tol, "ln")
    _check(lambda a, u: glu(a, u, act="gelu_tanh", lrp=lrp), lambda a, u: glu_dense(a, u, act="gelu_tanh", lrp=lrp),
           [x, 2 * x.flip(-1)], dy, tol, "glu")
    for act in ACTS:
        _check(lambda x: activation(x, act=act, lrp=lrp), lambda x: activation_dense(x, act=act, lrp=lrp),
               [x], dy, tol, act)


# ---- layouts: strided rows, chunked gate/up, many programs, empty inputs, dtypes ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lrp", MODES)
@pytest.mark.parametrize("act", GLU_ACTS)
def test_glu_phi3_chunked_gate_up(act, lrp, backend):
    """Phi3 splits one fused projection: gate and up are halves with row stride 2 * cols, read without a copy."""
    g = _gen("phi3", act, lrp)
    gate_up = _randn((2, 19, 200), g)
    gate, up = gate_up.chunk(2, -1)
    assert not gate.is_contiguous() and gate.stride(1) == 200
    rows = triton_glu._as_rows(gate)
    assert rows.data_ptr() == gate.data_ptr() and rows.stride(0) == 200
    dout = _randn((2, 19, 100), g)
    _check(lambda a, b: glu(a, b, act=act, lrp=lrp, backend=backend), lambda a, b: glu_dense(a, b, act=act, lrp=lrp),
           [gate, up], dout, TOL[torch.float32], f"phi3 {act}")
    # the fused tensor as the leaf: both halves of its gradient are filled
    leaf = gate_up.clone().requires_grad_()
    a, b = leaf.chunk(2, -1)
    glu(a, b, act=act, lrp=lrp, backend=backend).backward(dout)
    ref = gate_up.double().requires_grad_()
    a, b = ref.chunk(2, -1)
    glu_dense(a, b, act=act, lrp=lrp).backward(dout.double())
    assert rel_err(leaf.grad, ref.grad) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_strided_and_transposed_rows(backend):
    """Rows with a stride (a slice of a wider tensor: no copy) and a transposed input (last dim strided)."""
    g = _gen("strided")
    wide = _randn((37, 128), g, shift=0.5)
    w, b = _randn((100,), g, shift=1.0), _randn((100,), g)
    dy = _randn((37, 100), g)
    for x in (wide[:, 3:103], _randn((100, 37), g).t()):
        for kind in ("rms", "ln"):
            for lrp in (False, True):
                inputs = [x, w, b if kind == "ln" else None]
                _check(*_norm(kind, lrp, backend), inputs, dy, TOL[torch.float32], f"{kind} lrp={lrp}")
    # an activation on a transposed view, and a gradient broadcast from .sum() (stride 0)
    x = _randn((100, 37), g).t()
    leaf = x.clone().requires_grad_()
    activation(leaf, act="silu", lrp=True, backend=backend).sum().backward()
    assert rel_err(leaf.grad, torch.sigmoid(x.double())) < TOL[torch.float32]


@needs_interpreter
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_norm_partial_sums_over_many_programs(kind, monkeypatch):
    """Each backward program reduces a run of row tiles into one fp32 partial row; run boundaries inside the
    rows, a short last run, and bitwise-equal repeats (no atomics)."""
    monkeypatch.setattr(triton_norm, "MAX_PARTIALS", 3)
    g = _gen("partials", kind)
    x, dy = _randn((77, 1000), g, shift=0.2), _randn((77, 1000), g)  # BLOCK_R = 8: 10 tiles over 3 programs
    w, b = _randn((1000,), g, shift=1.0), _randn((1000,), g)
    inputs = [x, w, b] if kind == "ln" else [x, w - 1.0, None]
    for lrp in (False, True):
        fn, ref = _norm(kind, lrp, "triton", offset=1.0 if kind == "rms" else 0.0)
        _, first = _check(fn, ref, inputs, dy, TOL[torch.float32], f"lrp={lrp}")
        _, again = _run(fn, inputs, dy)
        assert all(a is None or torch.equal(a, c) for a, c in zip(first, again))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_gradients_only_when_needed(backend):
    g = _gen("needs")
    x, w, b, dy = _randn((9, 40), g), _randn((40,), g), _randn((40,), g), _randn((9, 40), g)
    # weight and bias frozen: x still gets its gradient
    xl = x.clone().requires_grad_()
    layer_norm(xl, w, b, EPS, backend=backend).backward(dy)
    xr = x.double().requires_grad_()
    layer_norm_dense(xr, w.double(), b.double(), EPS).backward(dy.double())
    assert rel_err(xl.grad, xr.grad) < TOL[torch.float32]
    # only the weight trains (x is data)
    wl = w.clone().requires_grad_()
    rms_norm(x, wl, EPS, backend=backend).backward(dy)
    wr = w.double().requires_grad_()
    rms_norm_dense(x.double(), wr, EPS).backward(dy.double())
    assert rel_err(wl.grad, wr.grad) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_dtype_and_mixed_weight_dtype(backend):
    """fp16 activations with an fp32 weight and an fp32 output (Gemma-style): each gradient in its input's dtype."""
    g = _gen("out_dtype")
    x, w, dy = _randn((2, 19, 96), g, torch.float16), _randn((96,), g, scale=0.2), _randn((2, 19, 96), g)
    out, _ = _check(lambda x, w: rms_norm(x, w, EPS, offset=1.0, out_dtype=torch.float32, backend=backend),
                    lambda x, w: rms_norm_dense(x, w, EPS, offset=1.0), [x, w], dy, TOL[torch.float16],
                    "rms out fp32", out_dtype=torch.float32)
    # the output is not rounded to fp16: fp32 accuracy on the fp16 input
    assert rel_err(out, rms_norm_dense(x.double(), w.double(), EPS, offset=1.0)) < 1e-6
    out = layer_norm(x, None, None, EPS, out_dtype=torch.float32, backend=backend)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    x = torch.randn(0, 3, 48, requires_grad=True)
    w = torch.randn(48, requires_grad=True)
    (rms_norm(x, w, EPS, backend=backend).sum() + layer_norm(x, w, None, EPS, backend=backend).sum()).backward()
    assert x.grad.shape == x.shape and (w.grad == 0).all()
    gate = torch.randn(4, 0, requires_grad=True)
    glu(gate, gate.detach(), backend=backend).sum().backward()
    assert gate.grad.shape == gate.shape
    assert activation(torch.randn(()), act="tanh", backend=backend).shape == ()


# ---- the rules' properties ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_lrp_conserves_relevance(offset, backend):
    """Identity rule: x * dx == y * dy element-wise (for any offset); the exact gradient is blind to the scale of
    x (RMSNorm is 0-homogeneous), so its x * dx sums to ~0 per row."""
    g = _gen("rms_cons", offset)
    x, dy = _randn((37, 100), g, shift=0.3), _randn((37, 100), g)
    w = _randn((100,), g, scale=0.3, shift=1.0 - offset)
    y, (dx, _) = _run(lambda x, w: rms_norm(x, w, EPS, offset=offset, lrp=True, backend=backend), [x, w], dy)
    assert rel_err(x * dx, y * dy) < 1e-5
    assert abs((x * dx).sum() - (y * dy).sum()) < 1e-4 * (y * dy).abs().sum()
    _, (dx_grad, _) = _run(lambda x, w: rms_norm(x, w, EPS, offset=offset, backend=backend), [x, w], dy)
    row_sums = (x * dx_grad).sum(-1)
    assert row_sums.abs().max() < 1e-3 * (y * dy).sum(-1).abs().max()
    assert rel_err(dx_grad, dx) > 0.02  # the projection term, ~ 1 / sqrt(D) of dx


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_lrp_conserves_relevance_without_bias(backend):
    """Rows of x * dx sum to rows of (y - b) * dy under the rule (the bias absorbs its share); not so exactly."""
    g = _gen("ln_cons")
    x, dy = _randn((37, 100), g, shift=0.7), _randn((37, 100), g)
    w, b = _randn((100,), g, shift=1.0), _randn((100,), g)
    y, (dx, _, _) = _run(lambda x, w, b: layer_norm(x, w, b, EPS, lrp=True, backend=backend), [x, w, b], dy)
    assert rel_err((x * dx).sum(-1), ((y - b) * dy).sum(-1)) < 1e-5
    _, (dx_grad, _, _) = _run(lambda x, w, b: layer_norm(x, w, b, EPS, backend=backend), [x, w, b], dy)
    assert rel_err((x * dx_grad).sum(-1), ((y - b) * dy).sum(-1)) > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", GLU_ACTS)
def test_glu_lrp_conserves_relevance(act, backend):
    g = _gen("glu_cons", act)
    gate, up, dout = (_randn((19, 100), g, scale=2.0) for _ in range(3))
    out, (dgate, dup) = _run(lambda a, b: glu(a, b, act=act, lrp=True, backend=backend), [gate, up], dout)
    assert rel_err(gate * dgate + up * dup, out * dout) < 1e-5
    # half the relevance to up, half through act (identity rule) to gate
    assert rel_err(up * dup, 0.5 * out * dout) < 1e-5 and rel_err(gate * dgate, 0.5 * out * dout) < 1e-5
    _, (dgate_exact, dup_exact) = _run(lambda a, b: glu(a, b, act=act, backend=backend), [gate, up], dout)
    assert torch.allclose(dup, 0.5 * dup_exact)
    assert rel_err(gate * dgate_exact + up * dup_exact, out * dout) > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_activation_lrp_identity_rule(act, backend):
    g = _gen("act_cons", act)
    x, dy = _randn((37, 100), g, scale=2.0), _randn((37, 100), g)
    y, (dx,) = _run(lambda x: activation(x, act=act, lrp=True, backend=backend), [x], dy)
    assert rel_err(x * dx, y * dy) < 1e-6
    _, (dx_exact,) = _run(lambda x: activation(x, act=act, backend=backend), [x], dy)
    if act == "relu":
        assert torch.equal(dx, dx_exact)  # relu(x) / x is relu's gradient
    else:
        assert rel_err(dx, dx_exact) > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_identity_rule_at_and_near_zero(act, backend):
    """act(x) / x takes its limit at x = 0 and stays finite and continuous for tiny |x| (fp32 and fp16)."""
    for dtype in (torch.float32, torch.float16):
        x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 1e-4, -1e-4], dtype=dtype)
        dy = torch.ones_like(x)
        _, (dx,) = _run(lambda x: activation(x, act=act, lrp=True, backend=backend), [x], dy)
        limit = ACTIVATION_RATIO_AT_ZERO[act]
        expect = torch.where(x > 0, 1.0, 0.0) if act == "relu" else torch.full_like(x, limit)
        assert torch.isfinite(dx).all() and torch.allclose(dx.float(), expect.float(), atol=1e-3), dx
        if act in GLU_ACTS:
            up = torch.full_like(x, 2.0)
            _, (dgate, dup) = _run(lambda a, b: glu(a, b, act=act, lrp=True, backend=backend), [x, up], dy)
            assert torch.allclose(dgate.float(), torch.full_like(dgate.float(), 0.5 * 2.0 * limit), atol=1e-3)
            assert dup.abs().max() < 1e-3


# ---- contract: errors, compile, dispatch ----

def _x():
    return torch.randn(3, 5, 16)


@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda: rms_norm(_x().numpy(), None, EPS), TypeError, "x must be a torch.Tensor"),
        (lambda: rms_norm(_x().int(), None, EPS), TypeError, "x has dtype torch.int32"),
        (lambda: rms_norm(_x(), torch.ones(15), EPS), ValueError, r"weight must have shape \(D,\) = \(16,\)"),
        (lambda: rms_norm(_x(), torch.ones(16, dtype=torch.int64), EPS), TypeError, "weight has dtype torch.int64"),
        (lambda: rms_norm(_x(), torch.ones(16, device="meta"), EPS), ValueError, "weight is on meta but x is on cpu"),
        (lambda: rms_norm(_x(), None, -1.0), ValueError, "eps must be a non-negative finite number"),
        (lambda: rms_norm(_x(), None, EPS, offset=float("inf")), ValueError, "offset must be a finite number"),
        (lambda: rms_norm(_x(), None, EPS, lrp="yes"), TypeError, "lrp must be a bool"),
        (lambda: rms_norm(_x(), None, EPS, backend="cuda"), ValueError, "backend must be None, 'triton' or 'torch'"),
        (lambda: rms_norm(_x(), None, EPS, out_dtype=torch.int8), TypeError, "out_dtype must be None or one of"),
        (lambda: rms_norm(torch.randn(()), None, EPS), ValueError, r"x must have shape \(..., D\)"),
        (lambda: layer_norm(_x(), None, torch.ones(16, 1), EPS), ValueError, r"bias must have shape \(D,\)"),
        (lambda: layer_norm(_x(), torch.ones(16), torch.ones(16, device="meta"), EPS), ValueError, "bias is on meta"),
        (lambda: glu(_x(), _x()[..., :8]), ValueError, "gate and up must have the same shape"),
        (lambda: glu(_x(), _x().half()), TypeError, "up has dtype torch.float16 but gate has torch.float32"),
        (lambda: glu(_x(), _x().to("meta")), ValueError, "up is on meta but gate is on cpu"),
        (lambda: glu(_x(), _x(), act="relu"), ValueError, r"act must be one of \('silu', 'gelu', 'gelu_tanh'\)"),
        (lambda: glu(_x(), [1.0]), TypeError, "up must be a torch.Tensor"),
        (lambda: activation(_x(), act="swish"), ValueError,
         r"act must be one of \('silu', 'gelu', 'gelu_tanh', 'tanh', 'relu'\), got 'swish'"),
        (lambda: activation(_x().long()), TypeError, "x has dtype torch.int64"),
        (lambda: activation(_x(), lrp=1), TypeError, "lrp must be a bool"),
        (lambda: activation(_x(), backend="cpu"), ValueError, "backend must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_row_width_over_kernel_limit():
    x = torch.randn(2, triton_norm.MAX_D + 1)
    with pytest.raises(ValueError, match="at most 65536"):
        triton_norm.norm_fwd(x, None, None, EPS)
    if interpreting():
        with pytest.raises(ValueError, match="larger than the Triton norm kernels support"):
            rms_norm(x, None, EPS)
    assert rms_norm(x, None, EPS, backend="torch").shape == x.shape


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(bindings_dispatch, "interpreting", lambda: False)
    x = _x()
    for call in (lambda: rms_norm(x, None, EPS, backend="triton"), lambda: glu(x, x, backend="triton"),
                 lambda: layer_norm(x, None, None, EPS, backend="triton"), lambda: activation(x, backend="triton")):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            call()
    with pytest.raises(TypeError, match="float64"):
        activation(x.double(), backend="triton")
    assert torch.isfinite(rms_norm(x, None, EPS)).all()  # auto: the torch path on CPU


@pytest.mark.parametrize("lrp", MODES)
def test_torch_compile_traces_the_ops(lrp):
    """fullgraph=True fails on any graph break; the fake implementations make the ops traceable."""
    g = _gen("compile", lrp)
    x, gate, w = _randn((2, 7, 32), g), _randn((2, 7, 32), g), _randn((32,), g, shift=1.0)

    def f(x, gate, w):
        h = rms_norm(x, w, EPS, lrp=lrp)
        return (glu(gate, h, act="silu", lrp=lrp) * 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, gate, w)]
    compiled(*leaves).backward()
    ref = [t.clone().requires_grad_() for t in (x, gate, w)]
    f(*ref).backward()
    for a, b in zip(leaves, ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """torch.library.opcheck: schemas, fake implementations, autograd registration, AOT dispatch."""
    g = _gen("opcheck")
    x, w, b = (_randn(s, g).requires_grad_() for s in ((3, 5, 16), (16,), (16,)))
    gate, up = (t.detach().requires_grad_() for t in _randn((3, 5, 32), g).chunk(2, -1))
    for op, args in ((rms_norm_fwd_op, (x, w, EPS, 1.0, torch.float32, True)),
                     (layer_norm_fwd_op, (x, w, b, EPS, torch.float32, True)),
                     (glu_fwd_op, (gate, up, "gelu", True)),
                     (activation_fwd_op, (x, "tanh", True))):
        torch.library.opcheck(op, (*args, backend))
