"""Argument checks of the public ops (attention, norms, GLU, activations), written once. Each raises TypeError or
ValueError naming the argument and what it got."""

import math
import numbers

import torch

from ..kernels.rules import RULES
from .dispatch import check_backend, uses_triton

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TRITON_HEAD_DIM = 256


def check_float_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")


def check_same_device(name, x, ref_name, ref):
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must be on one device")


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_number(name, value, *, non_negative=False):
    if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
            or (non_negative and value < 0)):
        raise ValueError(f"{name} must be a {'non-negative ' if non_negative else ''}finite number, got {value!r}")


def check_rule(rule):
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions {'(B, H, N, D)' if name == 'q' else '(B, Hkv, M, D)'}, "
                             f"got shape {tuple(x.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must have the same (B, Hkv, M), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of key/value heads ({Hkv})")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: float16, bfloat16, float32, float64")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; all three must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all three must be on one device")
    if q.shape[3] < 1:
        raise ValueError("head dim must be at least 1")


def _check_mask(key_padding_mask, q, k):
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor (B, M), got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = real token), got {key_padding_mask.dtype}")
    if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must have shape (B, M) = {(k.shape[0], k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def _check_index_tensor(name, t, shape, what, q):
    """An int32/int64 tensor of `shape` on q's device (segment_ids, key_limit)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 or int64 tensor {what}, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype torch.int32 or torch.int64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def check_attention_arguments(q, k, v, causal, scale, rule, window, softcap, key_padding_mask, backend, *,
                              segment_ids=None, key_limit=None, sinks=None, rel_bias=None):
    """Everything attention() takes, checked against its contract (README, the af.attention arguments)."""
    _check_qkv(q, k, v)
    if sinks is not None:
        check_float_tensor("sinks", sinks)
        if tuple(sinks.shape) != (q.shape[1],):
            raise ValueError(f"sinks must have shape (H,) = ({q.shape[1]},), one logit per query head, "
                             f"got {tuple(sinks.shape)}")
        check_same_device("sinks", sinks, "q", q)
    if rel_bias is not None:
        check_float_tensor("rel_bias", rel_bias)
        want = (q.shape[1], q.shape[2] + k.shape[2] - 1)
        if tuple(rel_bias.shape) != want:
            raise ValueError(f"rel_bias must have shape (H, N + M - 1) = {want}, one value per head and offset j - i, "
                             f"got {tuple(rel_bias.shape)}")
        check_same_device("rel_bias", rel_bias, "q", q)
    check_flag("causal", causal)
    check_rule(rule)
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or isinstance(softcap, bool)
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    _check_mask(key_padding_mask, q, k)
    B, N, M = q.shape[0], q.shape[2], k.shape[2]
    _check_index_tensor("segment_ids", segment_ids, (B, M), "(B, M)", q)
    if segment_ids is not None and N > M:
        raise ValueError(f"segment_ids needs N <= M (query i sits at key position i + M - N), got N={N}, M={M}")
    _check_index_tensor("key_limit", key_limit, (B, N), "(B, N)", q)
    if key_limit is not None and not causal:
        raise ValueError("key_limit replaces the causal bound: it needs causal=True")
    check_backend(backend)
    D = q.shape[3]
    if D > MAX_TRITON_HEAD_DIM and uses_triton(q.device, q.dtype, backend):
        raise ValueError(f"head dim {D} is larger than the Triton kernels support ({MAX_TRITON_HEAD_DIM}); "
                         "use backend='torch'")
