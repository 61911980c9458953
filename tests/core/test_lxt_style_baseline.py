"""The LXT-style baseline (attnlrp_fast/baselines/lxt_style.py: torch SDPA with the gradients rescaled, norms and GLU
patched in Python) computes af.explain's relevance, and refuses a model without Llama parts."""

import copy

import pytest
import torch
import transformers as tf

import attnlrp_fast as af
from attnlrp_fast.baselines import lxt_style
from bench import e2e


# --- the LXT-style baseline ---------------------------------------------------------------------------------
def _tiny_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)
    return tf.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_lxt_style_baseline_gives_af_explains_relevance(checkpoint):
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(1))
    expected = af.explain(model, input_ids=ids, backend="torch").relevance
    baseline = e2e._shallow_patch_copy(model)
    assert all(a is b for a, b in zip(model.parameters(), baseline.parameters()))   # weights shared
    calls = []   # HF checkpoints a layer's forward (its own hooks stay outside): count a submodule's calls
    handle = baseline.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    got = lxt_style.explain(baseline, ids, checkpoint=checkpoint)
    handle.remove()
    assert len(calls) == (2 if checkpoint else 1)      # HF checkpointing recomputes the layer in the backward
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)   # both float32 from float64
    # the original model is untouched: its plain forward still uses SDPA
    assert model.config._attn_implementation == "sdpa" and baseline.config._attn_implementation == lxt_style.NAME


def test_lxt_style_refuses_a_model_without_llama_parts():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="Llama-type models only"):
        lxt_style.patch(copy.deepcopy(model))
