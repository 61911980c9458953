"""Rules by what a module computes (models/generic.py, models/moe.py), encoder-decoder models, a user's family map,
and the families that used to crash: each against a float64 reference or an exact property of the rule."""

import pytest
import torch
import transformers as tf

import attnlrp_fast as af
from attnlrp_fast.kernels import interpreting
from attnlrp_fast.models import MLPReplacement, NormReplacement, replacement_for
from attnlrp_fast.reference import layer_norm_dense, rms_norm_dense
from attnlrp_fast.rules import identity_activation, split_product
from explicit_phi import phi_token_relevance
from explicit_t5 import t5_relevance
from helpers import rel_err
from tiny_models import COMMON

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1"))


def _phi(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    config = tf.PhiConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=128, partial_rotary_factor=0.5)
    return tf.PhiForCausalLM(config).to(dtype).eval()


def test_phi_equals_float64_layer_by_layer_reference():
    """Phi (the model of the paper's knowledge-neuron figure): parallel blocks, LayerNorm with bias, partial RoPE,
    a GELU MLP recognised from its children; af.explain equals the rules written out layer by layer."""
    model = _phi()
    ids = torch.randint(3, 61, (1, 13), generator=torch.Generator().manual_seed(5))
    e = af.explain(model, ids, backend="torch")
    token = int(e.target_ids[0])
    ref = phi_token_relevance(model, ids[0], ids.shape[1] - 1, token)
    assert rel_err(e.relevance[0].double(), ref) < 1e-6
    with af.lrp(model) as h:
        assert sorted(set(h.patched.values())) == ["activation", "layer_norm", "mlp"]


@pytest.mark.slow
def test_phi_triton_agrees_with_torch():
    model = _phi(dtype=torch.float32)
    ids = torch.randint(3, 61, (2, 11), generator=torch.Generator().manual_seed(6))
    a = af.explain(model, ids, backend="torch").relevance
    b = af.explain(model, ids, backend="triton" if interpreting() else "torch").relevance
    assert rel_err(b, a) < 1e-4


class _ToyMLP(torch.nn.Module):
    """An MLP no family map names, its activation a plain function in the forward (ReLU^2)."""

    def __init__(self, glu=False, fused=False):
        super().__init__()
        self.glu, self.fused = glu, fused
        self.w_in = torch.nn.Linear(12, 40 if fused else 20, bias=False)
        if glu and not fused:
            self.w_other = torch.nn.Linear(12, 20, bias=False)
        self.w_out = torch.nn.Linear(20, 12, bias=False)

    def forward(self, x):
        h = self.w_in(x)
        if self.fused:
            a, b = h.chunk(2, dim=-1)
            return self.w_out(torch.relu(b).square() * a)   # the gate is the second half
        if self.glu:
            return self.w_out(torch.relu(h).square() * self.w_other(x))
        return self.w_out(torch.relu(h).square())


def _patched_forward(module, rule="attnlrp"):
    found = replacement_for(module, af.FamilyMap(name="toy", model_types=()))
    assert found is not None and isinstance(found[0], MLPReplacement)
    replacement = found[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    for spec in replacement.candidates(None, module):
        fwd = replacement.forward(module, spec, rule != "grad", "torch")
        try:
            if rel_err(fwd(x), module(x)) < 1e-10:
                return spec, fwd
        except RuntimeError:
            continue
    raise AssertionError("no candidate matched")


@pytest.mark.parametrize("kind", ["mlp", "glu", "fused"])
def test_generic_mlp_matches_and_conserves(kind):
    """Recognised with its inline activation; without biases the identity and uniform rules conserve relevance
    through the block exactly, and under rule='grad' the gradient is the module's own."""
    torch.manual_seed(1)
    module = _ToyMLP(glu=kind != "mlp", fused=kind == "fused").double()
    spec, fwd = _patched_forward(module)
    assert spec.pattern == kind and spec.act == "relu2"
    if kind == "fused":
        assert not spec.gate_first
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    y = fwd(x)
    r_y = torch.randn_like(y) * y.abs()
    (g,) = torch.autograd.grad(y, x, r_y / y)
    assert torch.allclose((x * g).sum(), r_y.sum(), rtol=1e-9)
    _, exact = _patched_forward(module, rule="grad")
    x2 = x.detach().clone().requires_grad_()
    (g_exact,) = torch.autograd.grad(exact(x2).sum(), x2)
    (g_module,) = torch.autograd.grad(module(x2).sum(), x2)
    assert torch.allclose(g_exact, g_module)


def test_identity_activation_and_split_product():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    f = lambda t: torch.relu(t).square() + 0.1 * t   # noqa: E731
    y = identity_activation(x, f, lrp=True)
    assert torch.equal(y.detach(), f(x.detach()))
    r = torch.randn(50, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, r)
    assert torch.allclose(x * gx, y.detach() * r)     # R_in = R_out element-wise
    a = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.sigmoid(a) * a * (b.clamp(-1, 1) + 1)
    out = split_product(z, (a, b), lrp=True)
    assert torch.equal(out.detach(), z.detach())
    ga, gb = torch.autograd.grad(out, (a, b), r)
    assert torch.allclose(a * ga, z.detach() * r / 2) and torch.allclose(b * gb, z.detach() * r / 2)


class ToyNorm(torch.nn.Module):
    """A norm no map names (its class name says it is one): Cohere-style, LayerNorm-style or Gemma-style."""

    def __init__(self, n, center, bias, offset):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))
        self.bias = torch.nn.Parameter(torch.randn(n)) if bias else None
        self.eps, self.center, self.offset = 1e-5, center, offset

    def forward(self, x):
        c = x - x.mean(-1, keepdim=True) if self.center else x
        y = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.eps) * (self.offset + self.weight)
        return y + self.bias if self.bias is not None else y


@pytest.mark.parametrize("center,bias,offset", [(True, False, 0.0), (True, True, 0.0), (False, False, 1.0)])
def test_generic_norm_matches_the_oracle(center, bias, offset):
    torch.manual_seed(3)
    module = ToyNorm(24, center, bias, offset).double()
    replacement = NormReplacement()
    x = torch.randn(4, 24, dtype=torch.float64)
    chosen = [s for s in replacement.candidates(None, module)
              if rel_err(replacement.forward(module, s, True, "torch")(x), module(x)) < 1e-10]
    assert chosen and chosen[0].center == center and chosen[0].offset == offset
    xg = x.clone().requires_grad_()
    y = replacement.forward(module, chosen[0], True, "torch")(xg)
    do = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, xg, do)
    xr = x.clone().requires_grad_()
    if center:
        ref = layer_norm_dense(xr, module.weight.detach(), None if module.bias is None else module.bias.detach(),
                               module.eps, lrp=True)
    else:
        ref = rms_norm_dense(xr, module.weight.detach(), module.eps, offset=offset, lrp=True)
    (want,) = torch.autograd.grad(ref, xr, do)
    assert rel_err(got, want) < 1e-10


def _moe(config_cls, model_cls, **extra):
    torch.manual_seed(0)
    return model_cls(config_cls(**{**COMMON, **extra})).eval()


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])
def test_moe_families_explain_under_the_rules(name):
    """Experts found from their layout flags (Qwen2-MoE: shared expert behind a sigmoid gate; GPT-OSS: transposed,
    biased, interleaved experts with their own clamped gate, attention sinks): the uniform rule on routing weight x
    expert output means the experts' relevance is not the gradient's, the model is restored, both backends agree."""
    if name == "qwen2_moe":
        model = _moe(tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=24, shared_expert_intermediate_size=24)
    else:
        model = _moe(tf.GptOssConfig, tf.GptOssForCausalLM, num_local_experts=4, num_experts_per_tok=2,
                     layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    ids = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(7))
    before = model(ids).logits
    with af.lrp(model) as h:
        kinds = set(h.patched.values())
    assert "experts" in kinds
    e = af.explain(model, ids, backend="torch")
    grad = af.explain(model, ids, rule="grad", backend="torch").relevance
    assert torch.isfinite(e.relevance).all() and rel_err(e.relevance, grad) > 1e-3
    assert torch.equal(model(ids).logits, before)
    if interpreting():
        t = af.explain(model, ids, backend="triton").relevance
        assert rel_err(t, e.relevance) < 1e-4


def test_user_family_map():
    """A block the generic rules cannot read is refused naming it; a user's map naming it as linear (a container)
    is taken, and a map of the wrong type is a TypeError."""
    class OddMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(32))

        def forward(self, x):   # an operation no rule covers (the user vouches for the module: a container)
            return x * self.scale * torch.logsumexp(x, dim=-1, keepdim=True)

    model = _moe(tf.LlamaConfig, tf.LlamaForCausalLM)
    for layer in model.model.layers:
        layer.mlp = OddMLP()
    ids = torch.randint(3, 61, (1, 7))
    with pytest.raises(af.UnsupportedModelError, match=r"model.layers.0.mlp \(OddMLP\)"):
        af.explain(model, ids)
    family = af.FamilyMap(name="mine", model_types=("llama",), rms_norms={"LlamaRMSNorm": af.RMSNormSpec()},
                          containers=("OddMLP",))
    e = af.explain(model, ids, family=family, backend="torch")
    assert torch.isfinite(e.relevance).all()
    with pytest.raises(TypeError, match="FamilyMap"):
        af.lrp(model, family={"containers": ("OddMLP",)})


def _bart(seed=0):
    torch.manual_seed(seed)
    config = tf.BartConfig(vocab_size=61, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                           max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           decoder_start_token_id=2)
    return tf.BartForConditionalGeneration(config).eval()


def test_encoder_decoder_relevance_on_both_sides():
    """BART: relevance on the encoder tokens (e.relevance) and the decoder tokens (e.decoder_relevance); with
    rule='grad' both are gradient x input at the two embedding outputs, computed here by hand."""
    model = _bart()
    g = torch.Generator().manual_seed(8)
    ids, dec = torch.randint(3, 61, (2, 10), generator=g), torch.randint(3, 61, (2, 6), generator=g)
    e = af.explain(model, ids, decoder_input_ids=dec, backend="torch")
    assert e.relevance.shape == (2, 10) and e.decoder_relevance.shape == (2, 6)
    assert torch.isfinite(e.relevance).all() and torch.isfinite(e.decoder_relevance).all()
    grad = af.explain(model, ids, decoder_input_ids=dec, rule="grad", backend="torch")
    leaves = {}

    def keep(name):
        def hook(module, inputs, output):
            leaves[name] = output.detach().requires_grad_()
            return leaves[name] * 1.0
        return hook
    handles = [model.get_encoder().embed_tokens.register_forward_hook(keep("enc")),
               model.get_decoder().embed_tokens.register_forward_hook(keep("dec"))]
    try:
        logits = model(input_ids=ids, decoder_input_ids=dec).logits[:, -1]
    finally:
        for hd in handles:
            hd.remove()
    score = logits.gather(1, grad.target_ids[:, None]).sum()
    g_enc, g_dec = torch.autograd.grad(score, [leaves["enc"], leaves["dec"]])
    assert rel_err(grad.relevance, (leaves["enc"] * g_enc).sum(-1).detach()) < 1e-5
    assert rel_err(grad.decoder_relevance, (leaves["dec"] * g_dec).sum(-1).detach()) < 1e-5
    assert rel_err(e.decoder_relevance, grad.decoder_relevance) > 1e-3
    if interpreting():
        t = af.explain(model, ids, decoder_input_ids=dec, backend="triton")
        assert rel_err(t.relevance, e.relevance) < 1e-4 and rel_err(t.decoder_relevance, e.decoder_relevance) < 1e-4


def test_encoder_decoder_inputs_are_checked():
    model = _bart()
    ids = torch.randint(3, 61, (2, 10))
    with pytest.raises(ValueError, match="pass decoder_input_ids"):
        af.explain(model, ids)
    with pytest.raises(ValueError, match="decoder_input_ids has 1 rows, input_ids 2"):
        af.explain(model, ids, decoder_input_ids=torch.tensor([[2, 5]]))
    llama = _moe(tf.LlamaConfig, tf.LlamaForCausalLM)
    with pytest.raises(ValueError, match="not an encoder-decoder model"):
        af.explain(llama, ids, decoder_input_ids=ids)


def test_models_that_scale_embeddings_in_place_explain():
    """CTRL multiplies its embeddings in place: the captured leaf is not what the model writes into."""
    torch.manual_seed(0)
    model = tf.CTRLLMHeadModel(tf.CTRLConfig(vocab_size=61, n_embd=32, n_layer=2, n_head=4, dff=48,
                                             n_positions=64)).eval()
    e = af.explain(model, torch.randint(3, 61, (1, 8)), backend="torch")
    assert torch.isfinite(e.relevance).all()


def test_model_code_that_cannot_run_under_the_engine_is_refused_in_one_line():
    """GIT adds the mask to its scores itself: refused, naming the model, the line of its code and the reason."""
    torch.manual_seed(0)
    config = tf.GitConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=64,
                          vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=16, patch_size=8))
    model = tf.GitForCausalLM(config).eval()
    with pytest.raises(af.UnsupportedModelError, match=r"GitForCausalLM: its own code at modeling_git.py:\d+") as err:
        af.explain(model, torch.randint(3, 61, (1, 8)), backend="torch")
    assert "\n" not in str(err.value)


def _t5(gated=True, seed=0, tie=False):
    torch.manual_seed(seed)
    config = tf.T5Config(vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=20,
                         feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=tie,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return tf.T5ForConditionalGeneration(config).double().eval()


@pytest.mark.parametrize("gated,tie", [(True, False), (False, True)], ids=["flan_t5", "t5"])
def test_t5_equals_float64_layer_by_layer_reference(gated, tie):
    """Flan-T5 (gated GELU, untied head) and T5 (ReLU, tied head scaled by d_model^-0.5): relevance on the encoder
    and the decoder tokens equal to the rules written out in float64, the relative position bias computed from its
    table in the engine (never an N x M tensor)."""
    model = _t5(gated=gated, tie=tie)
    g = torch.Generator().manual_seed(9)
    ids, dec = torch.randint(2, 61, (1, 23), generator=g), torch.randint(2, 61, (1, 7), generator=g)
    e = af.explain(model, ids, decoder_input_ids=dec, backend="torch")
    enc_ref, dec_ref = t5_relevance(model, ids[0], dec[0], int(e.target_ids[0]))
    assert rel_err(e.relevance[0].double(), enc_ref) < 1e-6
    assert rel_err(e.decoder_relevance[0].double(), dec_ref) < 1e-6


def test_t5_bias_comes_from_its_table_and_both_backends_agree():
    """Inside af.lrp T5's compute_bias gives the table's (H, N + M - 1) vector of offsets, not the (1, H, N, M)
    tensor, equal to the tensor's diagonals; Triton and torch agree on the explanation."""
    model = _t5().float()
    g = torch.Generator().manual_seed(10)
    ids, dec = torch.randint(2, 61, (2, 19), generator=g), torch.randint(2, 61, (2, 5), generator=g)
    attn = model.encoder.block[0].layer[0].SelfAttention
    dense = attn.compute_bias(19, 19)[0]                                   # (H, N, M)
    with af.lrp(model, backend="torch"):
        bias = attn.compute_bias(19, 19)
        assert not isinstance(bias, torch.Tensor)
        vector = bias.vector(19, 19, torch.device("cpu"))
        e = af.explain(model, ids, decoder_input_ids=dec)
    assert vector.shape == (4, 37)
    i, j = torch.meshgrid(torch.arange(19), torch.arange(19), indexing="ij")
    assert torch.equal(vector[:, j - i + 18], dense)
    assert torch.isfinite(e.relevance).all()
    if interpreting():
        t = af.explain(model, ids, decoder_input_ids=dec, backend="triton")
        assert rel_err(t.relevance, e.relevance) < 1e-4 and rel_err(t.decoder_relevance, e.decoder_relevance) < 1e-4


@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_in_the_models_own_code_takes_the_rules(rule, impl, monkeypatch):
    """A model whose attention cannot go through the engine runs its own attention code under the rules
    (eager_rules.py): on Llama, made to look like such a model, with transformers' eager attention (matmul, softmax,
    matmul) or SDPA (torch's function, routed to af.attention), the relevance equals the engine's."""
    model = _moe(tf.LlamaConfig, tf.LlamaForCausalLM).double()
    ids = torch.randint(3, 61, (2, 11), generator=torch.Generator().manual_seed(11))
    engine = af.explain(model, ids, rule=rule, backend="torch").relevance
    model.set_attn_implementation(impl)
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with af.lrp(model, rule=rule, backend="torch") as h:
        assert h.eager_attention
        own = af.explain(model, ids).relevance
    assert rel_err(own, engine) < 1e-6   # (the relevance is returned in float32)
    grad = af.explain(model, ids, rule="grad", backend="torch").relevance
    assert rel_err(own, grad) > 1e-3


@pytest.mark.parametrize("name", ["gpt_neo", "bloom", "falcon", "xlnet"])
def test_families_outside_the_attention_interface_explain(name):
    """GPT-Neo (eager matmuls), BLOOM (ALiBi through baddbmm, an MLP that adds its residual), Falcon (SDPA) and
    XLNet (einsum, sequence-first embeddings): finite, one value per token, not gradient x input, the model restored,
    CP-LRP different again."""
    torch.manual_seed(0)
    config, cls = {
        "gpt_neo": (tf.GPTNeoConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                                    attention_types=[[["global", "local"], 1]], window_size=4, initializer_range=0.3),
                    tf.GPTNeoForCausalLM),
        "bloom": (tf.BloomConfig(vocab_size=61, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3),
                  tf.BloomForCausalLM),
        "falcon": (tf.FalconConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=64, initializer_range=0.3), tf.FalconForCausalLM),
        "xlnet": (tf.XLNetConfig(vocab_size=61, d_model=32, n_layer=2, n_head=4, d_inner=48, initializer_range=0.3),
                  tf.XLNetLMHeadModel),
    }[name]
    model = cls(config).eval()
    ids = torch.randint(3, 61, (1, 9), generator=torch.Generator().manual_seed(12))
    before = model(ids).logits
    e = af.explain(model, ids, backend="torch").relevance
    cp = af.explain(model, ids, rule="cp", backend="torch").relevance
    grad = af.explain(model, ids, rule="grad", backend="torch").relevance
    assert e.shape == ids.shape and torch.isfinite(e).all() and rel_err(e, grad) > 1e-3 and rel_err(cp, e) > 1e-3
    assert torch.equal(model(ids).logits, before)


def test_attention_modules_with_code_of_their_own_take_the_rules():
    """LongT5's local attention does not call the attention interface in a model that otherwise could: it runs its
    own code under the rules (not refused, not left with exact gradients)."""
    torch.manual_seed(0)
    config = tf.LongT5Config(vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                             num_heads=4, local_radius=3, relative_attention_num_buckets=8, decoder_start_token_id=0,
                             initializer_factor=3.0)
    model = tf.LongT5ForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(13)
    ids, dec = torch.randint(2, 61, (1, 12), generator=g), torch.randint(2, 61, (1, 4), generator=g)
    with af.lrp(model):
        wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "LongT5LocalAttention"
                   and "forward" in m.__dict__]
    assert wrapped
    e = af.explain(model, ids, decoder_input_ids=dec, backend="torch").relevance
    cp = af.explain(model, ids, decoder_input_ids=dec, rule="cp", backend="torch").relevance
    grad = af.explain(model, ids, decoder_input_ids=dec, rule="grad", backend="torch").relevance
    assert torch.isfinite(e).all() and rel_err(e, grad) > 1e-3 and rel_err(e, cp) > 1e-3


@pytest.mark.parametrize("name", ["bitnet", "minimax_m3"])
def test_mlps_of_no_form_run_their_own_code_under_the_rules(name):
    """BitNet's MLP (a norm between the product and the down projection) and MiniMax-M3's (a clamped SwiGLU times
    up + 1) match no MLP form: their own forward runs under the rules, operation by operation (the norm inside as
    replaced). Without biases the identity and uniform rules conserve the relevance through the block."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    if name == "bitnet":
        model = tf.BitNetForCausalLM(tf.BitNetConfig(**{**COMMON, "hidden_act": "relu2"})).double().eval()
        mlp = model.model.layers[0].mlp
        want = mlp(x)
        with af.lrp(model, backend="torch") as h:
            assert h.patched["model.layers.0.mlp"] == "mlp" and h._specs["BitNetMLP"][1].pattern == "own"
            y, g, r_y = _relevance_through(mlp.forward, x)
    else:
        from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLDenseMLP
        config = tf.MiniMaxM3VLTextConfig(**{**COMMON, "dense_intermediate_size": 40})
        mlp = MiniMaxM3VLDenseMLP(config).double()
        want = mlp(x)
        replacement = MLPReplacement()
        spec = replacement.candidates(None, mlp)[-1]
        assert spec.pattern == "own"
        y, g, r_y = _relevance_through(replacement.forward(mlp, spec, True, "torch"), x)
        assert torch.allclose(y, want)
        # the rules written out: uniform on (up + 1) * glu and on gate * sigmoid(alpha gate), identity through the
        # clamps and the sigmoid, the epsilon rule on up + 1 (the constant absorbs its share)
        W, Wd, lim, alpha = mlp.gate_up_proj.weight, mlp.down_proj.weight, mlp.swiglu_limit, mlp.swiglu_alpha
        h = x @ W.T
        gate, up = h.chunk(2, -1)
        gc, uc = gate.clamp(max=lim), up.clamp(-lim, lim)
        z = (uc + 1) * (gc * torch.sigmoid(gc * alpha))
        r_z = z * ((r_y / y) @ Wd)
        r_h = torch.cat([0.5 * r_z, uc / (uc + 1) * 0.5 * r_z], -1)
        assert torch.allclose(x * g, x * ((r_h / h) @ W), rtol=1e-8, atol=1e-12)
        return
    assert torch.allclose(y, want)
    assert torch.allclose((x * g).sum(), r_y.sum(), rtol=1e-8)


def _relevance_through(forward, x):
    xg = x.clone().requires_grad_()
    y = forward(xg)
    r_y = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(15)) * y.abs()
    (g,) = torch.autograd.grad(y, xg, r_y / y)
    return y.detach(), g, r_y
