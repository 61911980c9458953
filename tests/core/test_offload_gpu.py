"""Offload and sequence chunks on a GPU (bf16): the same relevance as the checkpointed explanation, the copies to
pinned host memory and back on the side stream in the backward's order, and less device memory at the peak."""

import pytest
import torch
import transformers as tf

import attnlrp_fast as af

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _llama(layers=8):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    return tf.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def test_offloaded_and_chunked_explanations_bfloat16():
    model = _llama()
    ids = torch.randint(3, 512, (1, 4096), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    want, plain = _peak(lambda: af.explain(model, ids, checkpoint=True).relevance)
    pinned = []
    with af.low_memory(model, offload="cpu") as handle:
        save = handle.offloader.save

        def saving(index, x):
            stash = save(index, x)
            pinned.append(stash.host.is_pinned())
            return stash
        handle.offloader.save = saving
        got, offloaded = _peak(lambda: af.explain(model, ids).relevance)
    assert torch.equal(got, want) and pinned and all(pinned)
    layers = len(handle.layers)
    assert handle.copies == [("to host", i) for i in range(layers)] + \
        [("to device", i) for i in reversed(range(layers))]
    assert handle.host_peak == layers * 4096 * 256 * 2 and offloaded < plain
    chunked, seq_peak = _peak(lambda: af.explain(model, ids, offload="cpu", seq_chunk=1024).relevance)
    err = (chunked.float() - want.float()).norm() / want.float().norm()
    assert err < 2e-2 and seq_peak < offloaded
