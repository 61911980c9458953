"""ALiBi attention that models compute in code of their own (BLOOM, MPT), swapped for the engine inside af.lrp.

These models' attention does not go through transformers' AttentionInterface: they add a per-head bias linear in
the key position (ALiBi, Press et al. 2022) to Q K^T and materialise the N x M scores. Inside af.lrp their attention
modules run ENGINE_FORWARDS instead: the same projections, then af.attention with causal masking, the key padding
mask and the bias as `rel_bias` (one value per head and offset j - i, computed in the kernel: O(N + M) memory),
then the same output projection. A bias slope_h * j + c (c constant per row) and slope_h * (j - i) give the same
softmax, so the model's key-position bias becomes the offset table exactly; alibi_table checks that the bias the
model passes is linear in the key position over the real keys, and refuses it (naming the module) otherwise.

The models build their mask with create_causal_mask: inside af.lrp their config names MASK_NAME, whose mask function
answers with a KernelMask (the (B, M) padding mask, or none), never an N x M tensor.
"""

import torch
import torch.nn.functional as F

from .common import UnsupportedModelError
from attnlrp_fast.bindings.attention import attention
from attnlrp_fast.bindings.hf import BACKEND_ATTR, ENGINE_CALLS, NAME, RULE_ATTR, KernelMask

MASK_NAME = NAME + "_kernel_mask"


def alibi_table(bias, key_padding_mask, N, name):
    """The (H, N + M - 1) offset table (rel_bias of af.attention) of a key-position bias `bias` (B, H, M) that the
    model adds to every query row: slope_h * (j - i), slope_h read from the bias over the real keys (True in
    key_padding_mask (B, M), all when None). UnsupportedModelError naming `name` when the bias is not linear in the
    key position with one slope per head across the batch."""
    B, H, M = bias.shape
    dtype = torch.promote_types(bias.dtype, torch.float32)
    if bias.is_meta:   # af.estimate_memory: shapes are all there is
        return bias.new_empty(H, N + M - 1, dtype=dtype)
    real = torch.ones(B, M, dtype=torch.bool, device=bias.device) if key_padding_mask is None else key_padding_mask
    pos = torch.arange(M, device=bias.device)
    first = torch.where(real, pos, M).amin(-1)                      # (B,) the first and last real key of each row
    last = torch.where(real, pos, -1).amax(-1)
    if bool((last < 0).any()):
        raise UnsupportedModelError(f"{name}: a batch row without a real key")
    b = bias.to(dtype)
    rows = torch.arange(B, device=bias.device)
    span = (last - first).clamp_min(1).to(b.dtype)
    slope = (b[rows, :, last] - b[rows, :, first]) / span[:, None]          # (B, H)
    fitted = b[rows, :, first][..., None] + slope[..., None] * (pos - first[:, None])[:, None, :]
    scale = b.abs().amax().clamp_min(1.0)
    tol = 1e-5 if bias.dtype in (torch.float32, torch.float64) else 2e-2
    off_line = ((b - fitted).abs() * real[:, None, :]).amax() > tol * scale
    if off_line or not torch.allclose(slope, slope[:1].expand_as(slope), rtol=tol, atol=tol):
        raise UnsupportedModelError(f"{name}: its position bias is not one slope per head times the key position "
                                    "(ALiBi), so the engine cannot compute it from an offset table")
    offsets = torch.arange(N + M - 1, device=bias.device, dtype=dtype) - (N - 1)
    return slope[0][:, None] * offsets


def _padding(attention_mask, name):
    if attention_mask is None:
        return None
    if isinstance(attention_mask, KernelMask):
        if attention_mask.segment_ids is not None or attention_mask.key_limit is not None:
            raise UnsupportedModelError(f"{name}: packed sequences or image-token blocks with ALiBi attention")
        return attention_mask.key_padding_mask
    raise UnsupportedModelError(f"{name}: got a {attention_mask.dim()}-D mask tensor inside af.lrp, where its model "
                                "builds a KernelMask (is its config's attention implementation changed?)")


def _engine(module, q, k, v, attention_mask, scale, bias, name):
    """af.attention on (B, H, N, D) q, k, v, causal, with the key padding and the ALiBi bias (B, H, M): (B, N, H D)."""
    B, H, N, _ = q.shape
    kpm = _padding(attention_mask, name)
    table = alibi_table(bias.detach(), kpm, N, name)
    if not torch.compiler.is_compiling():
        ENGINE_CALLS[0] += 1
    out = attention(q, k, v, causal=True, scale=float(scale), key_padding_mask=kpm,
                    rule=getattr(module, RULE_ATTR, "grad"), backend=getattr(module, BACKEND_ATTR, None),
                    rel_bias=table)
    return out.transpose(1, 2).reshape(B, N, -1)


def bloom_forward(module, name):
    """BloomAttention's forward through the engine (returns what it returns: the output with the residual added,
    and no attention weights)."""
    if getattr(module, "pretraining_tp", 1) > 1 and getattr(module, "slow_but_exact", False):
        return None   # its sliced output projection: left to its own code

    def forward(hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                output_attentions=False, **kwargs):
        B = hidden_states.shape[0]
        q, k, v = module._reshape(module.query_key_value(hidden_states))
        if layer_past is not None:
            k, v = layer_past.update(k, v, module.layer_idx)
        M = k.shape[2]
        bias = alibi.reshape(B, module.num_heads, -1)[..., -M:] * module.beta
        context = _engine(module, q, k, v, attention_mask, module.inv_norm_factor, bias, name)
        out = F.dropout(module.dense(context), p=module.hidden_dropout, training=module.training)
        return residual + out, None
    return forward


def mpt_forward(module, name):
    """MptAttention's forward through the engine (its output and no attention weights)."""
    def forward(hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
        B, N = hidden_states.shape[:2]
        qkv = module.Wqkv(hidden_states)
        if module.clip_qkv:
            qkv = qkv.clamp(min=-module.clip_qkv, max=module.clip_qkv)
        q, k, v = (t.reshape(B, N, module.n_heads, module.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
        past = 0 if cache is None else cache.get_seq_length(module.layer_idx)
        if cache is not None:
            k, v = cache.update(k, v, module.layer_idx)
        M = k.shape[2]
        if position_bias is None:
            raise UnsupportedModelError(f"{name}: MPT without its ALiBi bias")
        bias = position_bias[:, max(0, position_bias.size(1) - (N + past)):, max(0, position_bias.size(2) - M):]
        bias = bias[:, -1, :].unsqueeze(0).expand(B, -1, -1)                  # (B, H, M): the same for every row
        context = _engine(module, q, k, v, attention_mask, module.softmax_scale, bias, name)
        return module.out_proj(context), None
    return forward


# attention classes -> the engine forward for one module (None: this module stays with its own code)
ENGINE_FORWARDS = {"BloomAttention": bloom_forward, "MptAttention": mpt_forward}


def engine_forward(module, name):
    """The engine forward for `module` (an ALiBi attention module of a known class), or None."""
    make = ENGINE_FORWARDS.get(type(module).__name__)
    return None if make is None else make(module, name)


def kernel_mask(*args, **kwargs):
    """MASK_NAME's mask function: attnlrp_fast_mask's answer, always as a KernelMask (MPT calls .to(torch.bool) on
    the mask it builds; a KernelMask moves like a tensor and holds the padding, or nothing)."""
    from attnlrp_fast.bindings.hf import attnlrp_fast_mask

    mask = attnlrp_fast_mask(*args, **kwargs)
    return mask if isinstance(mask, KernelMask) else KernelMask(mask)


def register():
    """Register MASK_NAME with transformers (its mask function, and the engine as its attention function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from attnlrp_fast.bindings.hf import attnlrp_fast_attention
    AttentionInterface.register(MASK_NAME, attnlrp_fast_attention)
    AttentionMaskInterface.register(MASK_NAME, kernel_mask)
