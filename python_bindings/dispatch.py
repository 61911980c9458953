"""Which implementation runs, decided in one place: the backend of an op (Triton kernels or the torch path), and
the device and dtype a user's "auto" means.

  backend None / "auto": CUDA tensors -> Triton; CPU tensors -> the torch path, or Triton's interpreter when
                         TRITON_INTERPRET=1 was set before import; float64 -> the torch path (no float64 dot in
                         Triton). "triton" / "torch" force one side (an error says why "triton" cannot run).
                         Attention on CUDA decides per call (attention_choice): torch's fused SDPA kernels
                         (sdpa.py) where they express it, the Triton kernels where only they can, and where both
                         can, what the measured dispatch table (dispatch_table.py) found faster.
  device "auto": CUDA when there is one, else CPU.
  dtype "auto": bfloat16 on CUDA (float16 where the GPU has no bf16), float32 on CPU.
"""

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels import interpreting
from ..kernels.attention_common import length_bucket
from . import dispatch_table, sdpa

BACKENDS = ("auto", "triton", "torch")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_backend(backend):
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors on `device`: CUDA, or any device under TRITON_INTERPRET=1; and
    the meta device, where the launchers allocate what they would on a GPU and launch nothing (the memory estimate
    models a GPU run)."""
    return device.type in ("cuda", "meta") or interpreting()


def uses_triton(device: torch.device, dtype: torch.dtype, backend) -> bool:
    """Whether `backend` (None / "auto" | "triton" | "torch") means the Triton kernels for tensors on `device` of
    `dtype`."""
    if backend == "torch":
        return False
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError("backend='triton' does not take float64 tensors; use backend='torch' for float64")
        if not triton_runs_on(device):
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing attnlrp_fast (or use backend='torch' / move the tensors to CUDA)")
        return True
    return dtype != torch.float64 and triton_runs_on(device)


def pick(triton_fn, torch_fn, x, backend):
    """The Triton launcher or the torch-path function for tensors like x under `backend`, its tensor results made
    contiguous (dense)."""
    return dense(triton_fn if uses_triton(x.device, x.dtype, backend) else torch_fn)


def dense(fn):
    """fn with its tensor results made contiguous: the layout the custom ops' fake implementations promise to
    torch.compile, whichever path ran (the launchers allocate contiguous results; torch's fused attention returns
    the layout of its inputs)."""

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in out)
        return out.contiguous() if isinstance(out, torch.Tensor) else out
    return run


@dataclass(frozen=True)
class AttentionChoice:
    """Where one attention call runs and why. path: "triton" | "torch"; engine: what runs there, in words;
    forward / dq: the Triton forward variant to prefer and the dQ mode (None: the kernels' own defaults); exclude:
    the forward variants the table's GPU check failed (never taken by the kernels' auto choice)."""
    path: str
    engine: str
    reason: str
    forward: Optional[str] = None
    dq: Optional[str] = None
    exclude: tuple = ()


def _torch_engine(q, k, key_padding_mask, window, softcap, segment_ids, key_limit, rel_bias=None):
    why = sdpa.unsupported(q, k, window, softcap, segment_ids, key_limit, key_padding_mask, rel_bias)
    if why is None:
        name = sdpa.kernel_name(q, key_padding_mask, k, k)
        return "torch fused attention (CPU)" if name == "cpu" else f"torch SDPA ({name} kernel)", None
    return "torch, in query chunks", why


def _triton_engine(device, table):
    """The Triton engine in words, the table's forward to prefer and its dQ mode (ATTNLRP_FAST_DQ, when set, wins:
    an explicit setting over a measured default)."""
    where = "Triton's interpreter" if device.type != "cuda" else "Triton kernels"
    forward = table["forward"] if table else None
    dq = table.get("dq") if table and not os.environ.get("ATTNLRP_FAST_DQ", "").strip() else None
    return f"{where} (forward {forward or 'auto'}, dQ {dq or 'default'})", forward, dq


def _excluded(table):
    """The forward variants a table's GPU check failed."""
    return tuple(sorted(v for v in (table or {}).get("gated_out", {}) if v in ("hopper", "tma", "portable", "decode")))


def attention_choice(q, k, *, key_padding_mask=None, causal=False, window=None, softcap=None, rule="grad",
                     segment_ids=None, key_limit=None, backend=None, rel_bias=None) -> AttentionChoice:
    """Where attention on these tensors runs under `backend`, and why.

    "triton" / "torch": that path (on CUDA the Triton kernels take the table's forward and dQ mode when a table
    applies). None / "auto": float64 -> torch; meta tensors -> Triton (the memory estimate models the kernels);
    CPU -> torch, or Triton's interpreter under TRITON_INTERPRET=1; CUDA -> torch's fused SDPA kernels where they
    express the call, the Triton kernels where only they can (softcap, windows, segments, key limits, head dims
    off their list) and for the CP rule (its backward needs dV only), and where both can, the path the measured
    dispatch table names for the case (none: SDPA); never a path or variant the table's GPU check gated out."""
    device, dtype = q.device, q.dtype
    table = why_no_table = None
    if device.type == "cuda":
        table, why_no_table = dispatch_table.applicable_table(device)
    if backend == "torch":
        engine, why = _torch_engine(q, k, key_padding_mask, window, softcap, segment_ids, key_limit, rel_bias)
        return AttentionChoice("torch", engine, "backend='torch'" + (f" ({why})" if why else ""))
    if backend == "triton":
        uses_triton(device, dtype, backend)   # raises, saying why, where Triton cannot run
        engine, forward, dq = _triton_engine(device, table)
        return AttentionChoice("triton", engine, "backend='triton'", forward, dq, _excluded(table))
    if dtype == torch.float64 or not triton_runs_on(device):
        engine, chunked = _torch_engine(q, k, key_padding_mask, window, softcap, segment_ids, key_limit, rel_bias)
        why = "float64 (Triton has no float64 dot)" if dtype == torch.float64 else \
            f"{device.type} tensors (Triton runs on the CPU only in its interpreter, TRITON_INTERPRET=1)"
        return AttentionChoice("torch", engine, why + (f"; chunked: {chunked}" if chunked else ""))
    if device.type != "cuda":
        engine, _, _ = _triton_engine(device, None)
        why = "TRITON_INTERPRET=1" if interpreting() else "meta tensors: the memory estimate models the kernels"
        return AttentionChoice("triton", engine, why)
    engine, forward, dq = _triton_engine(device, table)
    gated = table.get("gated_out", {}) if table else {}
    triton = dict(forward=forward, dq=dq, exclude=_excluded(table))
    why = sdpa.unsupported(q, k, window, softcap, segment_ids, key_limit, key_padding_mask, rel_bias)
    if why is not None:
        return AttentionChoice("triton", engine, f"only the Triton kernels express it: {why}", **triton)
    if rule == "cp":
        return AttentionChoice("triton", engine, "the CP rule's backward needs dV only, which the Triton kernels "
                               "compute alone", **triton)
    if "sdpa" in gated:
        return AttentionChoice("triton", engine, f"the SDPA path failed the GPU check: {gated['sdpa']}", **triton)
    sdpa_engine, _ = _torch_engine(q, k, key_padding_mask, window, softcap, segment_ids, key_limit)
    if table is None:
        return AttentionChoice("torch", sdpa_engine, f"SDPA expresses it and {why_no_table}")
    case = dispatch_table.lookup(table, dispatch_table.features_of(causal, key_padding_mask is not None, q.shape[2]),
                                 str(dtype).removeprefix("torch."), q.shape[-1], length_bucket(max(q.shape[2],
                                                                                                   k.shape[2])))
    if case is None:
        return AttentionChoice("torch", sdpa_engine, "SDPA expresses it; the dispatch table measured no such case")
    times = ", ".join(f"{p} {ms:.3g} ms" for p, ms in sorted(case.get("ms", {}).items()))
    measured = f"measured at {case['bucket']} tokens ({times})" if times else f"measured at {case['bucket']} tokens"
    if case["path"] == "triton":
        return AttentionChoice("triton", engine, f"faster in the dispatch table: {measured}", **triton)
    return AttentionChoice("torch", sdpa_engine, f"faster in the dispatch table: {measured}")


def backend_for_many_passes(device: torch.device):
    """The backend for work of many forward/backward passes (generation, integrated gradients, evaluation): the
    kernels on CUDA, the torch path on CPU (Triton's interpreter is for checking the kernels, far too slow)."""
    return None if device.type == "cuda" else "torch"


def choose_device(name) -> torch.device:
    """"auto" | "cpu" | "cuda" -> a torch.device; ValueError naming the problem."""
    if name not in DEVICES:
        raise ValueError(f"device {name!r}: use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': no CUDA device is available here (use cpu or auto)")
    return torch.device(name)


def choose_dtype(name, device: torch.device) -> torch.dtype:
    """"auto" | "bfloat16" | "float16" | "float32" -> a torch.dtype for models on `device`."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


@dataclass(frozen=True)
class TensorSpec:
    """What attention_choice reads of a tensor (shape, dtype, device), to ask where a call would run without
    allocating it."""
    shape: tuple
    dtype: torch.dtype
    device: torch.device


# Cases `attnlrp-fast info` reports: (label, B, H, Hkv, N, M, D, options for attention_choice)
INFO_CASES = (
    ("causal prefill, 16k tokens, D=128, GQA 32/8", 1, 32, 8, 16384, 16384, 128, {"causal": True}),
    ("the same with key padding", 1, 32, 8, 16384, 16384, 128, {"causal": True, "padding": True}),
    ("bidirectional (encoder), 512 tokens, D=64", 8, 12, 12, 512, 512, 64, {}),
    ("decode: 1 query on a 32k cache", 1, 32, 8, 1, 32768, 128, {"causal": True}),
    ("sliding window 4096", 1, 32, 8, 16384, 16384, 128, {"causal": True, "window": 4096}),
    ("logit softcap 50", 1, 16, 8, 8192, 8192, 256, {"causal": True, "softcap": 50.0}),
    ("rule cp", 1, 32, 8, 16384, 16384, 128, {"causal": True, "rule": "cp"}),
    ("head dim 100", 1, 16, 16, 4096, 4096, 100, {"causal": True}),
)


def describe_attention(device: torch.device, dtype: torch.dtype, backend=None):
    """[(case label, AttentionChoice)] for INFO_CASES on `device` in `dtype` under `backend`."""
    rows = []
    for label, B, H, Hkv, N, M, D, options in INFO_CASES:
        opts = dict(options)
        padding = opts.pop("padding", False)
        q = TensorSpec((B, H, N, D), dtype, device)
        k = TensorSpec((B, Hkv, M, D), dtype, device)
        kpm = TensorSpec((B, M), torch.bool, device) if padding else None
        rows.append((label, attention_choice(q, k, key_padding_mask=kpm, backend=backend, **opts)))
    return rows
