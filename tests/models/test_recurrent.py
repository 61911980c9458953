"""Recurrent token mixers under MambaLRP's rule (attnlrp_fast/models/recurrent.py), against float64 references written
from the rule, each a plain sequential recurrence (not transformers' chunked or parallel forms): the recurrence's
coefficients held constant (Mamba's dt, B, C; a delta rule's query, key, decay and beta), the identity rule on the
activations and on the gated norm's normaliser, the uniform rule on the output gate's product."""

import pytest
import torch
import torch.nn.functional as F

import attnlrp_fast as af
from attnlrp_fast.models import UnsupportedModelError
from attnlrp_fast.models import recurrent

transformers = pytest.importorskip("transformers")


def _half(t):
    """The uniform rule's factor: value t, gradient halved."""
    return t.detach() + 0.5 * (t - t.detach())


def _identity(f, z):
    """The identity rule on an element-wise f: value f(z), gradient f(z) / z."""
    return z * (f(z) / z).detach()


def _conv(m, u, seq_len):
    """The mixer's causal depthwise convolution, then the identity rule on its SiLU."""
    k = m.conv1d.weight.shape[-1]
    u = F.conv1d(u, m.conv1d.weight, m.conv1d.bias, padding=k - 1, groups=u.shape[1])[..., :seq_len]
    return _identity(F.silu, u)


def mamba_reference(m, x):
    """A Mamba mixer (MambaMixer) under the rule, as a sequential scan."""
    batch, seq_len, _ = x.shape
    u, z = m.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    u = _conv(m, u, seq_len)                                            # (B, I, L)
    dt, b, c = torch.split(m.x_proj(u.transpose(1, 2)), [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], -1)
    dt, b, c = dt.detach(), b.detach(), c.detach()                      # the coefficients, held constant
    dt = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias)           # (B, L, I)
    a = -torch.exp(m.A_log)                                             # (I, N)
    state = x.new_zeros(batch, u.shape[1], m.ssm_state_size)
    ys = []
    for t in range(seq_len):
        state = torch.exp(a * dt[:, t, :, None]) * state + dt[:, t, :, None] * b[:, t, None, :] * u[:, :, t, None]
        ys.append((state * c[:, t, None, :]).sum(-1))
    y = torch.stack(ys, -1) + u * m.D[None, :, None]
    y = _half(y) * _half(_identity(F.silu, z))
    return m.out_proj(y.transpose(1, 2))


def mamba2_reference(m, x):
    """A Mamba-2 mixer (NemotronHMamba2Mixer) under the rule, as a sequential scan, gated group norm after it."""
    batch, seq_len, _ = x.shape
    heads, p, n, groups = m.num_heads, m.head_dim, m.ssm_state_size, m.n_groups
    gate, xbc, dt = m.in_proj(x).split([m.intermediate_size, m.conv_dim, heads], dim=-1)
    xbc = _conv(m, xbc.transpose(1, 2), seq_len).transpose(1, 2)
    u, b, c = xbc.split([m.intermediate_size, groups * n, groups * n], dim=-1)
    b, c, dt = b.detach(), c.detach(), dt.detach()
    dt = F.softplus(dt + m.dt_bias).clamp(m.time_step_limit[0], m.time_step_limit[1])        # (B, L, H)
    b = b.reshape(batch, seq_len, groups, n).repeat_interleave(heads // groups, dim=2)
    c = c.reshape(batch, seq_len, groups, n).repeat_interleave(heads // groups, dim=2)
    u = u.reshape(batch, seq_len, heads, p)
    a = -torch.exp(m.A_log)
    state = x.new_zeros(batch, heads, p, n)
    ys = []
    for t in range(seq_len):
        decay = torch.exp(a * dt[:, t])[..., None, None]
        state = decay * state + dt[:, t, :, None, None] * u[:, t, :, :, None] * b[:, t, :, None, :]
        ys.append((state * c[:, t, :, None, :]).sum(-1) + m.D[:, None] * u[:, t])
    y = torch.stack(ys, 1).reshape(batch, seq_len, -1)
    y = _half(y) * _half(_identity(F.silu, gate))
    grouped = y.view(batch, seq_len, -1, m.norm.group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + m.norm.variance_epsilon).detach()
    return m.out_proj(m.norm.weight * grouped.view(batch, seq_len, -1))


def deltanet_reference(m, x):
    """A gated delta-rule mixer (Qwen3_5GatedDeltaNet) under the rule, as the step-by-step recurrence
    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - S^T k_t))^T, o_t = S_t^T q_t, then the gated RMSNorm."""
    batch, seq_len, _ = x.shape
    hk, hv, dk, dv = m.num_k_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
    qkv = _conv(m, m.in_proj_qkv(x).transpose(1, 2), seq_len).transpose(1, 2)
    q, k, v = torch.split(qkv, [m.key_dim, m.key_dim, m.value_dim], dim=-1)
    q = q.detach().reshape(batch, seq_len, hk, dk).repeat_interleave(hv // hk, dim=2)
    k = k.detach().reshape(batch, seq_len, hk, dk).repeat_interleave(hv // hk, dim=2)
    v = v.reshape(batch, seq_len, hv, dv)
    z = m.in_proj_z(x).reshape(batch, seq_len, hv, dv)
    beta = torch.sigmoid(m.in_proj_b(x)).detach()
    g = (-m.A_log.exp() * F.softplus(m.in_proj_a(x) + m.dt_bias)).detach()
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * dk ** -0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    state = x.new_zeros(batch, hv, dk, dv)
    outs = []
    for t in range(seq_len):
        state = state * torch.exp(g[:, t])[..., None, None]
        delta = (v[:, t] - (state * k[:, t, :, :, None]).sum(-2)) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append((state * q[:, t, :, :, None]).sum(-2))
    o = torch.stack(outs, 1)                                            # (B, L, Hv, dv)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + m.norm.variance_epsilon).detach() * m.norm.weight
    o = _half(o) * _half(_identity(F.silu, z))
    return m.out_proj(o.reshape(batch, seq_len, -1))


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "mamba":
        cfg = transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                                       conv_kernel=3, time_step_rank=4)
        return transformers.MambaForCausalLM(cfg), lambda mdl: mdl.backbone.layers[1].mixer, mamba_reference
    if kind == "mamba2":
        cfg = transformers.NemotronHConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                           layers_block_type=["mamba", "attention"], mamba_num_heads=4,
                                           mamba_head_dim=6, ssm_state_size=5, n_groups=2, chunk_size=8, conv_kernel=3,
                                           intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=8)
        return transformers.NemotronHForCausalLM(cfg), lambda mdl: mdl.model.layers[0].mixer, mamba2_reference
    cfg = transformers.Qwen3_5TextConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=24,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                         linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6,
                                         linear_conv_kernel_dim=3)
    return transformers.Qwen3_5ForCausalLM(cfg), lambda mdl: mdl.model.layers[0].linear_attn, deltanet_reference


@pytest.mark.parametrize("kind,seq_len", [("mamba", 11), ("mamba2", 19), ("deltanet", 70)])
def test_mixer_relevance_equals_the_float64_reference(kind, seq_len):
    model, mixer_of, reference = _tiny(kind)
    model = model.double().eval().requires_grad_(False)
    mixer = mixer_of(model)
    g = torch.Generator().manual_seed(seq_len)
    x = torch.randn(2, seq_len, 16, dtype=torch.float64, generator=g)
    cotangent = torch.randn(2, seq_len, 16, dtype=torch.float64, generator=g)
    with af.lrp(model) as handle:
        assert handle.patched[next(n for n, m in model.named_modules() if m is mixer)] == "recurrence"
        xg = x.clone().requires_grad_()
        y = mixer(xg)
        (got,) = torch.autograd.grad(y, xg, cotangent)
    xr = x.clone().requires_grad_()
    y_ref = reference(mixer, xr)
    (want,) = torch.autograd.grad(y_ref, xr, cotangent)
    with torch.no_grad():
        own = mixer(x)
    # transformers' Mamba-2 and delta-rule code computes in float32 (casts inside): the float64 reference agrees
    # with it to float32's precision there, to float64's in Mamba
    tol = 1e-10 if kind == "mamba" else 1e-5
    assert (y - own).abs().max() < tol * own.abs().max() and (y_ref - own).abs().max() < tol * own.abs().max()
    assert (got - want).abs().max() < tol * want.abs().max()
    xs = x.clone().requires_grad_()
    (exact,) = torch.autograd.grad(mixer(xs), xs, cotangent)
    assert not torch.allclose(exact, got)   # the rule changes the gradient


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "deltanet"])
def test_recurrent_models_explain_with_every_rule(kind):
    model, _, _ = _tiny(kind)
    model = model.eval()
    ids = torch.randint(3, 64, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    e = af.explain(model, ids, backend="torch")
    t = af.explain(model, ids, backend="triton")   # the hybrids' attention layers in the Triton kernels
    assert torch.allclose(e.relevance, t.relevance, rtol=1e-3, atol=1e-5 * e.relevance.abs().max())
    g = af.explain(model, ids, rule="grad", backend="torch")
    cp = af.explain(model, ids, rule="cp", backend="torch")
    assert torch.isfinite(e.relevance).all() and torch.isfinite(cp.relevance).all()
    assert not torch.allclose(e.relevance, g.relevance)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)   # restored
    assert all(p.requires_grad for p in model.parameters())


def test_a_mixer_that_skips_its_scan_is_refused():
    model, mixer_of, _ = _tiny("mamba")
    mixer = mixer_of(model.eval())
    with af.lrp(model):
        inner = type(mixer).forward

        def around(self, hidden_states, **kwargs):   # a path that never reaches the scan (a fused kernel's)
            return self.out_proj(self.in_proj(hidden_states).chunk(2, dim=-1)[0])
        type(mixer).forward = around
        try:
            forward = recurrent.recurrent_forward("mixer", mixer, mixer.__class__.forward.__get__(mixer), None)
        finally:
            type(mixer).forward = inner
        x = torch.randn(1, 5, 16, requires_grad=True)
        with pytest.raises(UnsupportedModelError, match="ran without calling its scan"):
            forward(x)
        with torch.no_grad():   # without a gradient there is no rule to apply: the module's own forward
            assert forward(x).shape == (1, 5, 16)


def test_the_scan_is_restored_after_each_call():
    model, mixer_of, _ = _tiny("mamba")
    mixer = mixer_of(model.eval())
    namespace = __import__(type(mixer).__module__, fromlist=["_"])
    original = namespace.mamba_selective_scan
    with af.lrp(model):
        mixer(torch.randn(1, 4, 16, requires_grad=True)).sum().backward()
        assert namespace.mamba_selective_scan is original   # swapped for the call only
    assert recurrent.scan_functions(mixer) == {"mamba_selective_scan": original,   # the decode step's too
                                               "mamba_selective_state_update": namespace.mamba_selective_state_update}


def test_a_model_without_attention_or_recurrent_mixer_is_refused():
    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10)

        def forward(self, input_ids):
            return self.head(self.emb(input_ids))
    with pytest.raises(UnsupportedModelError, match="no attention module found"):
        af.lrp(Bag())


@pytest.mark.parametrize("kind", ["mamba", "deltanet"])
def test_recurrent_memory_is_estimated(kind):
    """af.estimate_memory runs the mixers' real path on meta tensors, and what it adds grows linearly."""
    model, _, _ = _tiny(kind)
    peaks = [af.estimate_memory(model.config, n, dtype=torch.float32).peak for n in (128, 256, 512)]
    assert 0 < peaks[0] < peaks[1] < peaks[2] and peaks[2] - peaks[1] <= 2.05 * (peaks[1] - peaks[0])
