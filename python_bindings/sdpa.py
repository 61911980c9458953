"""Attention on torch's own fused kernels, exact gradients times the rules' factors (kernels/rules.py): the torch
path's fast side, on CPU and on CUDA.

torch's fused attention kernels keep only O and the log-sum-exp and take them back in their backward, blockwise,
with no N x M tensor. They compute the exact gradients; every rule of this library is a fixed multiple of those
(dV x 1/2, dQ, dK x 1/4 for attnlrp, dQ = dK = 0 for cp), so scaling their results is the rule.

  CPU     aten._scaled_dot_product_flash_attention_for_cpu (+ _backward): GQA as it is, an additive key mask,
          computed in float32 (float64 for float64 inputs).
  CUDA    the kernel torch's own scaled_dot_product_attention picks for the call (kernel_name), so that an
          explanation runs on the kernel its baseline runs on: aten._scaled_dot_product_flash_attention (+ _backward;
          fp16 / bf16, GQA as it is, its backward reduces dK, dV over each group), ..._cudnn_attention (+ _backward),
          or ..._efficient_attention (+ _backward; also fp32); with a key padding mask always the memory-efficient
          one, with an additive (B, 1, 1, M) bias broadcast over heads and rows (never an N x M tensor). The cuDNN
          and memory-efficient kernels get each K/V head repeated for its query heads (dK, dV summed back over each
          group). Head dims a multiple of 8 up to 256, compute capability 8.0+.

These kernels know a causal mask aligned to the top-left corner only, so causal attention of N queries on M > N
keys (a cache) runs as two key segments, the first M - N keys seen by every query and the last N causal (a square:
top-left is bottom-right there), merged by their log-sum-exps; each segment's backward, given the merged O and
log-sum-exp, is exactly the whole softmax's gradient restricted to its keys. One query on any number of keys is not
causal at all (it sees them all). With N > M the first N - M queries see no key.

A sliding window runs on CPU in bands: query rows in chunks, each on the keys any of its rows may see (the window
before it, causal or not), with an additive (rows x keys) mask of that band (window_bands; the mask at most
BAND_ELEMENTS per batch element; float32 compute, float64 keeps the chunked path). A chunk holds whole rows, so its
O and log-sum-exp are the softmax's own, and its backward given them is exact; dK, dV add up over the chunks whose
bands overlap. Softcaps, segment ids and key limits (and windows on CUDA) would need an N x M mask here:
`unsupported` says so, and the torch path takes its chunked route for them (torch_path.py), auto the Triton kernels
(dispatch.py).

Conventions as the kernels': O in q's dtype and an fp32 natural-log LSE (B, H, N), +inf (and O = 0) for rows that
see no key.
"""

import torch

from ..kernels.rules import ATTENTION_FACTORS

_aten = torch.ops.aten
_CPU_FWD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_BWD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
MAX_HEAD_DIM = 256
EFFICIENT_LSE_ROWS = 32     # the memory-efficient kernel's LSE rows come padded to a multiple of this
BIAS_ALIGN = 16             # and its bias rows must start 16 elements apart (torch pads them the same way)


def compute_dtype(dtype):
    """float32 (float64 for float64 inputs): the torch path's compute dtype and every path's statistics dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# torch's SDPBackend numbers (torch.nn.attention.SDPBackend) -> the adapters below
_SDP_CHOICE = {1: "flash", 2: "efficient", 3: "cudnn"}


def kernel_name(q, key_padding_mask=None, k=None, v=None, causal=False):
    """Which fused kernel runs for tensors like q: "cpu", or on CUDA "flash", "cudnn" or "efficient". Given k and v
    (tensors), the one torch's own scaled_dot_product_attention would pick for the unmasked call
    (torch._fused_sdp_choice, which follows torch.nn.attention.sdpa_kernel settings), so that an explanation runs on
    the kernel its baseline runs on; with a key padding mask the memory-efficient kernel (the one that takes the
    broadcast bias used here); else flash for fp16 / bf16 and memory-efficient for fp32."""
    if q.device.type == "cpu":
        return "cpu"
    if key_padding_mask is not None:
        return "efficient"
    if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and hasattr(torch, "_fused_sdp_choice"):
        square = q.shape[2] == k.shape[2]
        try:
            chosen = torch._fused_sdp_choice(q, k, v, None, 0.0, bool(causal and square),
                                             enable_gqa=q.shape[1] != k.shape[1])
        except (RuntimeError, TypeError):   # a torch whose choice function differs: the fixed rule
            chosen = None
        if chosen in _SDP_CHOICE:
            return _SDP_CHOICE[chosen]
    return "flash" if q.dtype in (torch.float16, torch.bfloat16) else "efficient"


def unsupported(q, k, window=None, softcap=None, segment_ids=None, key_limit=None, key_padding_mask=None,
                rel_bias=None):
    """Why torch's fused attention cannot compute this call (None when it can)."""
    if rel_bias is not None:
        return "a relative position bias would need an N x M bias in torch's fused kernels"
    if softcap is not None:
        return "torch's fused kernels take no logit softcap"
    if segment_ids is not None or key_limit is not None:
        return "segment ids and key limits would need an N x M mask in torch's fused kernels"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "no queries or no keys"
    if window is not None and q.device.type != "cpu":
        return "a sliding window would need an N x M mask in torch's fused CUDA kernels"
    if window is not None and q.dtype == torch.float64:
        return ("a sliding window in float64 (the dtype of the exactness checks) keeps the chunked path their "
                "tolerances were set against")
    if q.device.type == "cpu":
        return None if _CPU_FWD is not None else f"this torch ({torch.__version__}) has no fused CPU attention"
    if q.device.type != "cuda":
        return f"torch's fused kernels run here on CPU and CUDA tensors, not {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"torch's fused CUDA kernels take float16, bfloat16 or float32, not {q.dtype}"
    D = q.shape[-1]
    if D % 8 or D > MAX_HEAD_DIM:
        return f"torch's fused CUDA kernels take head dims that are a multiple of 8 up to {MAX_HEAD_DIM}, not {D}"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "torch's fused CUDA kernels are used here from compute capability 8.0"
    return None


# --- the kernels, one adapter per device and kind: fwd -> (o, lse (B, H, rows) fp32), bwd -> (dq, dk, dv) --------
def _cpu_fwd(q, k, v, bias, causal, scale):
    o, lse = _CPU_FWD(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    return o, lse


def _cpu_bwd(do, q, k, v, o, lse, bias, causal, scale):
    return _CPU_BWD(do, q, k, v, o, lse, 0.0, causal, attn_mask=bias, scale=scale)


def _flash_fwd(q, k, v, bias, causal, scale):
    out = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def _flash_bwd(do, q, k, v, o, lse, bias, causal, scale):
    # dense inputs: no cumulative sequence lengths; without dropout the random-number state is never read
    unused = torch.empty(0, dtype=torch.int64, device=q.device)
    return _aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, unused, unused,
        scale=scale)


def _group_keys(q, k, v):
    """K, V with each head repeated for the query heads of its group (the memory-efficient kernel takes no GQA)."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _broadcast_bias(bias, q, k):
    return None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _efficient_fwd(q, k, v, bias, causal, scale):
    kg, vg = _group_keys(q, k, v)
    o, lse, _, _ = _aten._scaled_dot_product_efficient_attention(q, kg, vg, _broadcast_bias(bias, q, kg), True,
                                                                   0.0, causal, scale=scale)
    return o, lse[:, :, : q.shape[2]]


def _efficient_bwd(do, q, k, v, o, lse, bias, causal, scale):
    kg, vg = _group_keys(q, k, v)
    rows = q.shape[2]
    padded = -(-rows // EFFICIENT_LSE_ROWS) * EFFICIENT_LSE_ROWS
    lse = torch.nn.functional.pad(lse.float(), (0, padded - rows)).contiguous()
    unused = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        do, q, kg, vg, _broadcast_bias(bias, q, kg), o, lse, unused, unused, 0.0, [True, True, True, False], causal,
        scale=scale)
    return (dq, *_group_sums(dk, dv, k.shape[1]))


def _group_sums(dk, dv, kv_heads):
    """dK, dV of repeated K/V heads summed back over each group."""
    B, H, M, D = dk.shape
    if H == kv_heads:
        return dk, dv
    return dk.reshape(B, kv_heads, H // kv_heads, M, D).sum(2), dv.reshape(B, kv_heads, H // kv_heads, M, D).sum(2)


def _cudnn_fwd(q, k, v, bias, causal, scale):
    kg, vg = _group_keys(q, k, v)
    out = _aten._scaled_dot_product_cudnn_attention(q, kg, vg, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1].reshape(q.shape[:3])      # its log-sum-exp comes as (B, H, N, 1)


def _cudnn_bwd(do, q, k, v, o, lse, bias, causal, scale):
    kg, vg = _group_keys(q, k, v)
    unused = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
        do, q, kg, vg, o, lse.float().reshape(q.shape[:3] + (1,)).contiguous(), unused, unused, None, None, None,
        q.shape[2], k.shape[2], 0.0, causal, scale=scale)
    return (dq, *_group_sums(dk, dv, k.shape[1]))


KERNELS = {"cpu": (_cpu_fwd, _cpu_bwd), "flash": (_flash_fwd, _flash_bwd), "efficient": (_efficient_fwd, _efficient_bwd),
           "cudnn": (_cudnn_fwd, _cudnn_bwd)}


# --- segments and masks ------------------------------------------------------------------------------------------
def segments(N, M, causal):
    """(first query, first key, end key, causal) of the fused calls covering the attention."""
    if not causal or N == 1 and M >= 1:
        return [(0, 0, M, False)]
    if N > M:   # the first N - M queries see no key
        return [(N - M, 0, M, True)]
    return ([(0, 0, M - N, False)] if M > N else []) + [(0, M - N, M, True)]


def _segment_bias(kpm, k0, k1, dtype):
    """(B, 1, 1, k1 - k0) additive mask of a segment's keys (-inf where padded), its rows BIAS_ALIGN-aligned."""
    if kpm is None:
        return None
    width = k1 - k0
    row = torch.zeros(kpm.shape[0], 1, 1, -(-width // BIAS_ALIGN) * BIAS_ALIGN, dtype=dtype, device=kpm.device)
    row[..., :width].masked_fill_(~kpm[:, None, None, k0:k1].bool(), float("-inf"))
    return row[..., :width]


def _segment_sees(kpm, q0, k0, k1, causal, N, device):
    """(B or 1, 1, N - q0) bool: which query rows of a segment see at least one real key in it."""
    rows = N - q0
    if kpm is None:
        return torch.ones(1, 1, rows, dtype=torch.bool, device=device)
    real = kpm[:, k0:k1].bool()
    if not causal:
        return real.any(-1)[:, None, None].expand(-1, 1, rows)
    first = torch.where(real.any(-1), real.int().argmax(-1), k1 - k0)   # first real key of the segment
    return (torch.arange(rows, device=kpm.device)[None] >= first[:, None])[:, None]


def _operands(q, kind):
    """The dtype the kernel computes in: float32 (float64) on CPU, the inputs' own dtype on CUDA."""
    return compute_dtype(q.dtype) if kind == "cpu" else q.dtype


# --- sliding windows on CPU: query rows in bands ---------------------------------------------------------------
BAND_ELEMENTS = 1 << 20     # a band's mask: at most this many elements per batch element (4 MiB in float32)
MIN_BAND_ROWS = 16


def covering(window, N, M):
    """The window, or None where it cuts nothing (no query is as far as `window` from any key)."""
    return None if window is None or window >= N + M else window


def band_rows(N, M, window, causal, batch=1):
    """Query rows per band: rows * (rows + reach) * batch <= BAND_ELEMENTS, reach = the keys one row may see."""
    reach = window if causal else 2 * window - 1
    budget = BAND_ELEMENTS / max(1, batch)
    rows = int((-reach + (reach * reach + 4 * budget) ** 0.5) / 2)
    return max(MIN_BAND_ROWS, min(N, rows))


def window_bands(N, M, causal, window, rows):
    """(i0, i1, k0, k1): query rows i0..i1-1 (row i at position i + M - N) and the keys k0..k1-1 any of them may
    see under the window (k1 <= k0: none)."""
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        first, last = i0 + M - N, i1 - 1 + M - N
        k0 = max(0, first - window + 1)
        k1 = min(M, last + 1 if causal else last + window)
        yield i0, i1, k0, k1


def _band_mask(kpm, i0, i1, k0, k1, N, M, causal, window, dtype, device):
    """The band's additive mask (B or 1, 1, rows, keys), -inf where a row may not see a key, and which rows see
    one ((B or 1, 1, rows) bool)."""
    qpos = torch.arange(i0, i1, device=device)[:, None] + (M - N)
    kpos = torch.arange(k0, k1, device=device)[None, :]
    keep = qpos - kpos < window
    keep &= kpos <= qpos if causal else kpos - qpos < window
    keep = keep[None, None]
    if kpm is not None:
        keep = keep & kpm[:, None, None, k0:k1].to(device=device, dtype=torch.bool)
    bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
    return bias, keep.any(-1)


def _window_fwd(q, qf, kf, vf, kpm, causal, scale, window):
    B, H, N, D = q.shape
    M = kf.shape[2]
    o = torch.zeros((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, N), float("inf"), dtype=torch.float32, device=q.device)
    for i0, i1, k0, k1 in window_bands(N, M, causal, window, band_rows(N, M, window, causal, B)):
        if k1 <= k0:
            continue
        bias, sees = _band_mask(kpm, i0, i1, k0, k1, N, M, causal, window, qf.dtype, q.device)
        o_c, l_c = _cpu_fwd(qf[:, :, i0:i1], kf[:, :, k0:k1], vf[:, :, k0:k1], bias, False, scale)
        o[:, :, i0:i1] = torch.where(sees[..., None], o_c, 0.0)    # the kernel may leave NaN where a row sees none
        lse[:, :, i0:i1] = l_c.masked_fill(~sees, float("inf"))
    return o, lse


def _window_bwd(dof, qf, kf, vf, of, lse_f, kpm, causal, scale, window):
    B, H, N, D = qf.shape
    Hkv, M = kf.shape[1], kf.shape[2]
    dq = torch.zeros_like(qf)
    dk = torch.zeros((B, Hkv, M, D), dtype=qf.dtype, device=qf.device)
    dv = torch.zeros_like(dk)
    for i0, i1, k0, k1 in window_bands(N, M, causal, window, band_rows(N, M, window, causal, B)):
        if k1 <= k0:
            continue
        bias, _ = _band_mask(kpm, i0, i1, k0, k1, N, M, causal, window, qf.dtype, qf.device)
        g_q, g_k, g_v = _cpu_bwd(dof[:, :, i0:i1], qf[:, :, i0:i1], kf[:, :, k0:k1], vf[:, :, k0:k1], of[:, :, i0:i1],
                                 lse_f[:, :, i0:i1], bias, False, scale)
        dq[:, :, i0:i1] = g_q
        dk[:, :, k0:k1] += g_k
        dv[:, :, k0:k1] += g_v
    return dq, dk, dv


def attention_fwd(q, k, v, key_padding_mask=None, *, causal=False, scale=1.0, window=None):
    """O (B, H, N, D) in q's dtype and LSE (B, H, N) fp32 (+inf where a row sees no key). window: CPU only (bands,
    module docstring)."""
    B, H, N, D = q.shape
    kind = kernel_name(q, key_padding_mask, k, v, causal)
    fwd = KERNELS[kind][0]
    ct = _operands(q, kind)
    qf, kf, vf = (x.to(ct) for x in (q, k, v))
    kpm = key_padding_mask
    window = covering(window, N, k.shape[2])
    if window is not None:
        return _window_fwd(q, qf, kf, vf, kpm, causal, scale, window)
    acc = torch.float64 if ct == torch.float64 else torch.float32      # what the segments merge in
    parts = segments(N, k.shape[2], causal)
    o = lse = None
    for q0, k0, k1, seg_causal in parts:
        o_s, l_s = fwd(qf[:, :, q0:], kf[:, :, k0:k1], vf[:, :, k0:k1], _segment_bias(kpm, k0, k1, ct), seg_causal,
                       scale)
        l_s = l_s.to(acc)
        if kpm is not None or len(parts) > 1 or q0 > 0:   # rows that may see nothing in this segment
            sees = _segment_sees(kpm, q0, k0, k1, seg_causal, N, q.device)
            l_s = l_s.masked_fill(~sees, float("-inf"))
            o_s = torch.where(sees[..., None], o_s, 0.0)   # the kernels may leave NaN where a row sees nothing
        if o is None and q0 == 0 and len(parts) == 1:
            o, lse = o_s, l_s
            break
        if o is None:
            o = torch.zeros((B, H, N, D), dtype=acc, device=q.device)
            lse = torch.full((B, H, N), float("-inf"), dtype=acc, device=q.device)
        merge_block(o[:, :, q0:], lse[:, :, q0:], o_s, l_s)
    return o.to(q.dtype), lse.masked_fill(lse == float("-inf"), float("inf")).float()


def merge_block(o, lse, o_s, l_s):
    """Merge one key block's attention (o_s, l_s: its output and log-sum-exp, -inf where a row saw none of its keys)
    into the running (o, lse) over the blocks before, in place: lse <- logaddexp(lse, l_s), o <- the two outputs
    weighted by their shares of the new sum. o, lse: views of the accumulators, in the merge dtype."""
    merged = torch.logaddexp(lse, l_s)
    safe = torch.where(merged == float("-inf"), 0.0, merged)
    o.mul_(torch.exp(lse - safe)[..., None]).addcmul_(o_s, torch.exp(l_s - safe)[..., None])   # (no copy of o)
    lse.copy_(merged)


def attention_bwd(do, q, k, v, o, lse, key_padding_mask=None, *, causal=False, scale=1.0, rule="grad", window=None):
    """dq, dk, dv under `rule`: the fused kernels' exact gradients given the saved O and LSE, times the rule's
    factors. window: as attention_fwd's."""
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    kind = kernel_name(q, key_padding_mask, k, v, causal)
    bwd = KERNELS[kind][1]
    ct = _operands(q, kind)
    qf, kf, vf, dof, of = (x.to(ct) for x in (q, k, v, do, o))
    # rows that see no key: every logit is masked there, so any finite log-sum-exp gives them P = 0
    lse_f = lse.masked_fill(torch.isinf(lse), 0.0)
    lse_f = lse_f.to(ct) if kind == "cpu" else lse_f.float()
    window = covering(window, N, M)
    parts = [] if window is not None else segments(N, M, causal)
    grads = None if window is None else list(_window_bwd(dof, qf, kf, vf, of, lse_f, key_padding_mask, causal, scale,
                                                         window))
    for q0, k0, k1, seg_causal in parts:
        part = bwd(dof[:, :, q0:], qf[:, :, q0:], kf[:, :, k0:k1], vf[:, :, k0:k1], of[:, :, q0:], lse_f[:, :, q0:],
                   _segment_bias(key_padding_mask, k0, k1, ct), seg_causal, scale)
        if len(parts) == 1 and q0 == 0:
            grads = list(part)      # the rules' factors (0, 1/4, 1/2, 1) scale exactly in any dtype
            break
        if grads is None:
            acc = torch.float64 if ct == torch.float64 else torch.float32
            grads = [torch.zeros((B, H, N, D), dtype=acc, device=q.device),
                     torch.zeros((B, Hkv, M, D), dtype=acc, device=q.device),
                     torch.zeros((B, Hkv, M, D), dtype=acc, device=q.device)]
        grads[0][:, :, q0:] += part[0]
        grads[1][:, :, k0:k1] += part[1]
        grads[2][:, :, k0:k1] += part[2]
    dq, dk, dv = grads
    qk_factor, dv_factor = ATTENTION_FACTORS[rule]
    return _scaled(dq, qk_factor, q.dtype), _scaled(dk, qk_factor, k.dtype), _scaled(dv, dv_factor, v.dtype)


def _scaled(x, factor, dtype):
    """x * factor in dtype, with no pass over x where the factor is 1."""
    return (x if factor == 1.0 else x.mul_(factor)).to(dtype)
