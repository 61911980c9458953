"""attn_implementation="attnlrp_fast" on the two mask patterns beyond flags: packed sequences (segment ids) and
Gemma 3's bidirectional image-token blocks (per-query key limits), against transformers' own SDPA path, logits and
input gradients; and what stays refused."""

import pytest
import torch
import transformers as tf

import attnlrp_fast  # noqa: F401  (registers attn_implementation="attnlrp_fast")
from attnlrp_fast.bindings.hf import KernelMask, _block_key_limit
from tiny_models import COMMON, VOCAB, build
from tiny_models import GEMMA3_IMAGE as IMAGE
from tiny_models import gemma3_with_images as _gemma3

def _run(model, implementation, **inputs):
    """Logits and the gradient of their sum at the input embeddings, under an attention implementation."""
    model.set_attn_implementation(implementation)
    embeds = model.get_input_embeddings()
    grads = []
    handle = embeds.register_forward_hook(lambda m, i, o: o.register_hook(grads.append) and None)
    try:
        logits = model(**inputs).logits
        logits.float().pow(2).sum().backward()
    finally:
        handle.remove()
    return logits.detach(), grads[0]


def _close(a, b):
    assert torch.allclose(a[0], b[0], rtol=1e-4, atol=1e-5), (a[0] - b[0]).abs().max()
    assert torch.allclose(a[1], b[1], rtol=1e-4, atol=1e-5), (a[1] - b[1]).abs().max()


@pytest.mark.parametrize("layer_types", [["full_attention", "sliding_attention"], ["sliding_attention"] * 2])
def test_gemma3_image_blocks_match_sdpa(layer_types):
    model, side = _gemma3(layer_types)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (2, 23), generator=g)
    ids[0, 3:7] = IMAGE                       # one image early in row 0, two in row 1 (one across a block boundary)
    ids[1, 6:10] = IMAGE
    ids[1, 15:19] = IMAGE
    mask = torch.ones_like(ids)
    mask[0, :2] = 0                           # left padding
    pixels = torch.randn(3, 3, side, side, generator=g)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, token_type_ids=(ids == IMAGE).long(),
                  use_cache=False)
    _close(_run(model, "attnlrp_fast", **inputs), _run(model, "sdpa", **inputs))


def test_gemma3_generation_with_images_matches_sdpa():
    model, side = _gemma3(["full_attention", "sliding_attention"])
    ids = torch.randint(3, 60, (1, 15), generator=torch.Generator().manual_seed(2))
    ids[0, 4:8] = IMAGE
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, side, side), token_type_ids=(ids == IMAGE).long())
    out = {}
    for implementation in ("attnlrp_fast", "sdpa"):
        model.set_attn_implementation(implementation)
        out[implementation] = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(out["attnlrp_fast"], out["sdpa"])


def test_an_image_block_longer_than_the_window_is_refused():
    model, side = _gemma3(["sliding_attention"], window=3, tokens_per_image=4)
    ids = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(3))
    ids[0, 2:6] = IMAGE
    model.set_attn_implementation("attnlrp_fast")
    with pytest.raises(NotImplementedError, match="longer than the sliding window"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, side, side), token_type_ids=(ids == IMAGE).long())


def test_block_key_limits_from_the_contract():
    blocks = torch.tensor([[-1, 0, 0, 0, -1, -1, 1, 1, -1]])
    limit = _block_key_limit(blocks, 0, 9, 0, 9, None)
    assert limit.tolist() == [[0, 3, 3, 3, 4, 5, 7, 7, 8]]
    # queries at the end of a cache: positions 6..8 of 9 keys
    assert _block_key_limit(blocks, 6, 3, 0, 9, None).tolist() == [[7, 7, 8]]


@pytest.mark.parametrize("family", ["llama", "mistral"])     # mistral: a sliding window inside each sequence
def test_packed_sequences_match_sdpa(family):
    model = build(family).eval()
    ids = torch.randint(3, VOCAB, (1, 19), generator=torch.Generator().manual_seed(4))
    packed = torch.cat([torch.arange(7), torch.arange(5), torch.arange(7)])[None]
    inputs = dict(input_ids=ids, position_ids=packed, use_cache=False)
    ours, theirs = _run(model, "attnlrp_fast", **inputs), _run(model, "sdpa", **inputs)
    _close(ours, theirs)
    # and it is not what the same tokens give as one sequence
    single = _run(model, "sdpa", input_ids=ids, use_cache=False)
    assert not torch.allclose(ours[0], single[0], atol=1e-4)


def test_the_kernel_mask_moves_like_a_tensor():
    m = KernelMask(torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.int32), None)
    moved = m.to("cpu", non_blocking=True)
    assert moved.segment_ids.dtype == torch.int32 and moved.key_limit is None and m.to(torch.float16) is m


def test_patterns_that_stay_refused():
    cfg = tf.LlamaConfig(**{**COMMON, "attn_implementation": "attnlrp_fast"})
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, VOCAB, (1, 9))
    from transformers.masking_utils import create_causal_mask
    with pytest.raises(NotImplementedError, match="mask pattern"):
        create_causal_mask(config=model.config, inputs_embeds=model.get_input_embeddings()(ids), attention_mask=None,
                           cache=None, position_ids=None, or_mask_function=lambda b, h, q, k: q >= 0)
