"""BLOOM's and MPT's ALiBi attention, which they compute in code of their own, swapped for the engine inside af.lrp
(attnlrp_fast/models/alibi.py): the attention layer's relevance against the float64 dense rules with ALiBi written out
(slope_h = 2^(-8 h / H), bias slope_h (j - i)), both backends, every rule, a left-padded batch; no N x M mask."""

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.bindings.hf import KernelMask
from attnlrp_fast.models import UnsupportedModelError
from attnlrp_fast.models.alibi import alibi_table
from attnlrp_fast.reference import attention_dense

transformers = pytest.importorskip("transformers")
H = 4


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "bloom":
        cfg = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=H)
        model = transformers.BloomForCausalLM(cfg)
        return model, model.transformer.h[1].self_attention
    cfg = transformers.MptConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=H, max_seq_len=64)
    model = transformers.MptForCausalLM(cfg)
    return model, model.transformer.blocks[1].attn


def _layer_reference(kind, module, x, args, kwargs, kpm, rule):
    """The attention layer under `rule`, from its own projections and the dense float64 attention with ALiBi."""
    B, N, _ = x.shape
    D = module.head_dim
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=x.dtype) / H)
    table = slopes[:, None] * torch.arange(-(N - 1), N, dtype=x.dtype)[None, :]
    if kind == "bloom":
        qkv = module.query_key_value(x).view(B, N, H, 3, D)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
        scale = module.inv_norm_factor
    else:
        q, k, v = (t.reshape(B, N, H, D).transpose(1, 2) for t in module.Wqkv(x).chunk(3, dim=2))
        scale = module.softmax_scale
    o = attention_dense(q, k, v, causal=True, scale=scale, key_padding_mask=kpm, rule=rule, rel_bias=table)
    context = o.transpose(1, 2).reshape(B, N, -1)
    if kind == "bloom":
        residual = kwargs["residual"] if "residual" in kwargs else args[1]
        return module.dense(context) + residual
    return module.out_proj(context)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rule", ["attnlrp", "cp", "grad"])
@pytest.mark.parametrize("kind", ["bloom", "mpt"])
def test_alibi_layer_relevance_equals_the_dense_rules(kind, rule, backend):
    model, module = _tiny(kind)
    dtype = torch.float64 if backend == "torch" else torch.float32
    model = model.to(dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(len(kind) + len(rule))
    ids = torch.randint(3, 64, (2, 13), generator=g)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :4] = 0                                                   # row 0 left-padded
    seen = []
    hook = module.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    try:
        with af.lrp(model, rule=rule, backend=backend) as handle:
            assert handle.patched["transformer." + ("h.1.self_attention" if kind == "bloom" else "blocks.1.attn")] \
                == "alibi_attention"
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            args, kwargs = seen[-1]
            x = (args[0] if args else kwargs["hidden_states"]).clone().requires_grad_()
            got_out = module(x, *args[1:], **kwargs)[0]
            cotangent = torch.randn(got_out.shape, dtype=dtype, generator=g)
            (got,) = torch.autograd.grad(got_out, x, cotangent)
    finally:
        hook.remove()
    assert isinstance(kwargs.get("attention_mask"), KernelMask)      # the mask is (B, M) padding, never N x M
    xr = x.detach().double().requires_grad_()
    m64 = module.double()
    kpm = mask.bool()
    want_out = _layer_reference(kind, m64, xr, tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                                     else a for a in args),
                                {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                                 for k, v in kwargs.items()}, kpm, rule)
    (want,) = torch.autograd.grad(want_out, xr, cotangent.double())
    real = kpm[:, :, None]                                              # padded queries' rows: not compared
    tol = 1e-7 if dtype == torch.float64 else 1e-4
    assert ((got_out.double() - want_out) * real).abs().max() < tol * want_out.abs().max()
    assert ((got.double() - want) * real).abs().max() < tol * want.abs().max()


@pytest.mark.parametrize("kind", ["bloom", "mpt"])
def test_alibi_models_explain_and_are_restored(kind):
    model, _ = _tiny(kind)
    model.eval()
    ids = torch.randint(3, 64, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    attn = model.config._attn_implementation
    e = af.explain(model, ids, backend="torch")
    t = af.explain(model, ids, backend="triton")
    assert torch.isfinite(e.relevance).all()
    assert torch.allclose(e.relevance, t.relevance, rtol=1e-3, atol=1e-5 * e.relevance.abs().max())
    assert model.config._attn_implementation == attn and "_attn_implementation_internal" in vars(model.config)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_a_bias_that_is_not_alibi_is_refused():
    pos = torch.arange(9, dtype=torch.float64)
    slopes = torch.tensor([0.5, 0.25])
    line = (slopes[:, None] * pos + 3.0).expand(2, 2, 9)                # one slope per head, any constant: fine
    table = alibi_table(line, None, 9, "layer")
    assert torch.allclose(table, slopes[:, None] * torch.arange(-8, 9, dtype=torch.float64))
    padded = line.clone()
    padded[1, :, :3] = 7.0                                              # padding keys hold anything
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, :3] = False
    assert torch.allclose(alibi_table(padded, kpm, 9, "layer"), table)
    with pytest.raises(UnsupportedModelError, match="layer: its position bias is not one slope per head"):
        alibi_table((slopes[:, None] * pos ** 2).expand(2, 2, 9), None, 9, "layer")
    with pytest.raises(UnsupportedModelError, match="not one slope per head"):
        alibi_table(torch.stack([line[0], 2 * line[1]]), None, 9, "layer")   # another slope in another row


@pytest.mark.parametrize("kind", ["bloom", "mpt"])
def test_alibi_memory_is_linear_in_the_length(kind):
    """af.estimate_memory runs the real path on meta tensors: doubling the length doubles what it adds (no N x M
    scores or mask)."""
    model, _ = _tiny(kind)
    if kind == "mpt":
        model.config.max_seq_len = 4096
    peaks = [af.estimate_memory(model.config, n, dtype=torch.float32).peak for n in (512, 1024, 2048)]
    assert peaks[2] - peaks[1] <= 2.05 * (peaks[1] - peaks[0])
