"""af.attention: the public attention function (DESIGN.md section 3), with its argument checks."""

import math
import numbers

import torch

from attnlrp_fast.bindings import attention_fwd_op, uses_triton

RULES = ("grad", "attnlrp", "cp")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TRITON_HEAD_DIM = 256


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions {'(B, H, N, D)' if name == 'q' else '(B, Hkv, M, D)'}, "
                         f"got shape {tuple(x.shape)}")


def _check_arguments(q, k, v, causal, scale, rule, window, softcap, key_padding_mask, backend):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, M, D), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of key/value heads ({Hkv})")
    if q.dtype not in DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: float16, bfloat16, float32, float64")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; all three must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all three must be on one device")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or isinstance(softcap, bool)
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor (B, M), got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool (True = real token), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape (B, M) = {(k.shape[0], k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    D = q.shape[3]
    if D < 1:
        raise ValueError("head dim must be at least 1")
    if D > MAX_TRITON_HEAD_DIM and uses_triton(q.device, q.dtype, backend or "auto"):
        raise ValueError(f"head dim {D} is larger than the Triton kernels support ({MAX_TRITON_HEAD_DIM}); "
                         "use backend='torch'")


def attention(q, k, v, *, causal=False, scale=None, rule="grad", window=None, softcap=None,
              key_padding_mask=None, backend=None):
    """Scaled dot-product attention whose backward follows an explanation rule.

    q (B, H, N, D); k, v (B, Hkv, M, D) with H % Hkv == 0 (grouped-query attention without copying
    K/V); any strides. Returns (B, H, N, D) in q's dtype.

    rule: "grad" exact gradients | "attnlrp" (AttnLRP: dV = 1/2, dQ = dK = 1/4 of the exact gradients, the
    softcap's tanh under the identity rule) | "cp" (CP-LRP: dQ = dK = 0, dV exact). The forward is the same.
    causal: queries aligned to the end of the keys (query i sees key j iff j <= i + M - N).
    window=W: also (i + M - N) - j < W, and j - (i + M - N) < W when not causal.
    softcap=c: logits -> c * tanh(logits / c). key_padding_mask: bool (B, M), True = real token.
    scale: defaults to 1 / sqrt(D). backend: None (auto) | "triton" | "torch".
    A query row that sees no key outputs zeros and gets zero gradient.
    """
    _check_arguments(q, k, v, causal, scale, rule, window, softcap, key_padding_mask, backend)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    o, _ = attention_fwd_op(q, k, v, key_padding_mask, causal, float(scale), int(window or 0),
                            float(softcap or 0.0), rule, backend or "auto")
    return o
