"""Models as users already run them: bitsandbytes-quantized, accelerate-offloaded (device_map, CPU and disk offload),
torch.compile'd (wrapped, or compiled inside af.lrp), with HF gradient checkpointing on; and the custom ops' fake
implementations against the real ops (torch.library.opcheck) on HF-layout strides."""

import copy
import importlib.util

import pytest
import torch
import transformers as tf

import attnlrp_fast as af
from attnlrp_fast.bindings.attention import attention_fwd_op
from attnlrp_fast.lrp_patch import HANDLE_ATTR
from tiny_models import COMMON, VOCAB, build

BACKENDS = ["torch", "triton"]


def _ids(n=12, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _grad_x_input(model, ids):
    e = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=e, use_cache=False).logits[0, -1]
    logits[logits.argmax()].backward()
    return (e * e.grad).sum(-1).detach()


# --- quantized models --------------------------------------------------------------------------------------------
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama on disk; widths are multiples of 64 (bitsandbytes' CPU 4-bit matmul takes no less)."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**COMMON, "hidden_size": 64, "intermediate_size": 128}))
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return folder, _frozen(model)


@needs_bnb
@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_quantized_models_explain_like_the_unquantized_one(saved_llama, quant):
    folder, plain = saved_llama
    if quant == "int8":
        config = tf.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                       bnb_4bit_compute_dtype=torch.float32)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
    weights = {p.dtype for p in model.parameters()}
    assert weights & {torch.uint8, torch.int8}          # the weights really are quantized
    ids = _ids()
    want = af.explain(plain, input_ids=ids, backend="torch").relevance
    got = af.explain(model, input_ids=ids, backend="torch").relevance
    assert torch.isfinite(got).all()
    assert _cosine(got, want) > 0.99 and (got - want).norm() < 0.1 * want.norm()
    assert not hasattr(model, HANDLE_ATTR)


# --- offloaded models (accelerate) -------------------------------------------------------------------------------
def _offloaded(how, model, folder, tmp_path):
    import accelerate

    if how == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device="cpu")
    if how == "disk_offload":
        return accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    # device_map with a layer and the head on disk, loaded from the folder like device_map="auto" would place them
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    return tf.AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=str(tmp_path / "o"))


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "device_map"])
def test_offloaded_models_explain_as_the_plain_model_and_are_restored(saved_llama, tmp_path, how):
    folder, plain = saved_llama
    model = _frozen(_offloaded(how, copy.deepcopy(plain), folder, tmp_path))
    assert any(p.is_meta for p in model.parameters())       # the weights really are elsewhere between calls
    ids = _ids(15, seed=1)
    before = model(input_ids=ids).logits
    want = af.explain(plain, input_ids=ids, backend="torch")
    got = af.explain(model, input_ids=ids, backend="torch")
    assert torch.allclose(got.relevance, want.relevance, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.target_logit, want.target_logit, rtol=1e-5, atol=1e-6)
    # and with layer checkpointing and MLP chunks wrapped around accelerate's hooks
    low = af.explain(model, input_ids=ids, backend="torch", checkpoint=True, mlp_chunk=4)
    assert torch.allclose(low.relevance, want.relevance, rtol=1e-5, atol=1e-6)
    assert torch.equal(model(input_ids=ids).logits, before)
    hooked = [m for m in model.modules() if hasattr(m, "_hf_hook")]
    assert hooked and all("_old_forward" in m.__dict__ and m._old_forward.__func__ is type(m).forward
                          for m in hooked if hasattr(m._old_forward, "__func__"))


# --- torch.compile -----------------------------------------------------------------------------------------------
def test_explaining_a_compiled_model_explains_the_model_inside_and_leaves_nothing():
    model = _frozen(build("llama"))
    ids = _ids()
    want = af.explain(model, input_ids=ids, backend="torch").relevance
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    seen = []
    handle = compiled._orig_mod.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    first = af.explain(compiled, input_ids=ids, backend="torch").relevance
    second = af.explain(compiled, input_ids=ids, backend="torch").relevance
    handle.remove()
    assert torch.allclose(first, want, atol=1e-6) and torch.allclose(second, want, atol=1e-6)
    assert not torch.allclose(second, _grad_x_input(compiled._orig_mod, ids), atol=1e-4)   # still AttnLRP
    assert seen == [1, 1]                           # the model's own signature: logits at the target position only
    assert HANDLE_ATTR not in compiled._orig_mod.__dict__ and HANDLE_ATTR not in compiled.__dict__
    with af.lrp(compiled, backend="torch") as h:    # af.lrp on the wrapper patches the model inside
        assert h.model is compiled._orig_mod and af.explain(compiled, input_ids=ids).rule == "attnlrp"
    assert HANDLE_ATTR not in compiled._orig_mod.__dict__


def _compiled_relevance(model, ids, compiler, use_cache, position_ids=None):
    """Gradient x input of the top logit, through `model` compiled inside af.lrp (fullgraph), or eager."""
    with af.lrp(model, backend="torch"):
        run = torch.compile(model, backend=compiler, fullgraph=True) if compiler else model
        e = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = run(inputs_embeds=e, use_cache=use_cache, position_ids=position_ids).logits[0, -1]
        logits[logits.argmax()].backward()
        return (e * e.grad).sum(-1).detach()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral"])    # gemma2, mistral: sliding windows
@pytest.mark.parametrize("use_cache", [False, True])
def test_a_model_compiled_inside_lrp_gives_the_eager_relevance(family, use_cache):
    torch._dynamo.reset()
    model, ids = _frozen(build(family)), _ids(13, seed=2)
    eager = _compiled_relevance(copy.deepcopy(model), ids, None, use_cache)
    compiled = _compiled_relevance(copy.deepcopy(model), ids, "aot_eager", use_cache)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(eager, _grad_x_input(model, ids), atol=1e-4)


@pytest.mark.slow
def test_inductor_backward_through_the_ops_gives_the_eager_relevance():
    torch._dynamo.reset()
    model, ids = _frozen(build("llama")), _ids(13, seed=3)
    eager = _compiled_relevance(copy.deepcopy(model), ids, None, False)
    compiled = _compiled_relevance(copy.deepcopy(model), ids, "inductor", False)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5)


def test_packed_position_ids_are_refused_compiled_and_segmented_eager():
    model, ids = _frozen(build("llama")), _ids(12)
    packed = torch.cat([torch.arange(6), torch.arange(6)])[None]
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="pack several sequences"):   # traced, the packing cannot be read
        _compiled_relevance(copy.deepcopy(model), ids, "aot_eager", False, packed)
    # eager, transformers' packed mask is read: each sequence sees only itself (tests/bindings/test_hf_masks.py checks the
    # values against SDPA); the second sequence's tokens give the same relevance as when explained alone
    two = _compiled_relevance(copy.deepcopy(model), ids, None, False, packed)
    alone = _compiled_relevance(copy.deepcopy(model), ids[:, 6:], None, False, torch.arange(6)[None])
    assert torch.allclose(two[:, 6:], alone, rtol=1e-5, atol=1e-6) and (two[:, :6] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, window, softcap, padded", [(True, 0, 0.0, False), (False, 0, 0.0, True),
                                                             (True, 5, 3.0, False)])
def test_opcheck_attention_on_hf_layout_strides(backend, causal, window, softcap, padded):
    """Fake implementations against the real op (shapes and strides), autograd and AOT dispatch, on the layout HF
    hands over: (B, N, H, D) memory viewed as (B, H, N, D), GQA 4/2, lengths off the block sizes."""
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, N, D = 2, 4, 2, 13, 16
    q = torch.randn(B, N, H, D, generator=g).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, N, Hkv, D, generator=g).transpose(1, 2).requires_grad_() for _ in range(2))
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0, :3] = False
    torch.library.opcheck(attention_fwd_op, (q, k, v, kpm if padded else None, causal, 0.25, window, softcap,
                                             "attnlrp", backend))


# --- HF gradient checkpointing -----------------------------------------------------------------------------------
def test_hf_gradient_checkpointing_is_replaced_by_explains_own_with_a_warning():
    model = _frozen(build("llama"))
    ids = _ids()
    want = af.explain(model, input_ids=ids, backend="torch").relevance
    model.activation_checkpointing_enable()            # transformers 5's name for gradient_checkpointing_enable
    layers = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda m, i, o: layers.append(1))
    with pytest.warns(UserWarning, match="checkpoints every layer itself"):
        got = af.explain(model, input_ids=ids, backend="torch").relevance
    assert torch.allclose(got, want, atol=1e-6)
    assert len(layers) == 2 * len(model.model.layers)   # each layer ran again in the backward: checkpointed
    assert model.is_activation_checkpointing
