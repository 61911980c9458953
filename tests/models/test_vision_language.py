"""Vision-language models (LLaVA, Gemma 3, Qwen2-VL / Qwen2.5-VL): af.lrp patches vision tower, projector and
language model; af.explain gives the token relevance, one patch-grid map per image and the image / text shares; a
float64 reference written from the rules; a constructed image whose answer depends on one patch; the
`explain --image` command end to end; Qwen2-VL's patch order against its image processor."""

import copy

import pytest
import torch
import torch.nn.functional as F

import attnlrp_fast as af
from attnlrp_fast.kernels import interpreting
from helpers import rel_err
from tiny_models import GEMMA3_IMAGE as IMAGE
from tiny_models import gemma3_with_images as _gemma3
from tiny_models import LLAVA_IMAGE_TOKEN, QWEN_VL_IMAGE_TOKEN, build, inputs, llava, qwen_vl, qwen_vl_inputs

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def _subconfig_attn(model):
    c = model.config
    return c._attn_implementation, c.vision_config._attn_implementation, c.text_config._attn_implementation


# --- the float64 reference: CLIP tower + projector + Llama with the AttnLRP rules as modified gradients ------------
def _half(x):
    """The uniform rule on a product of two input-dependent factors: each factor gets half of the gradient."""
    return 0.5 * x + (0.5 * x).detach()


def _ratio_act(x, f):
    """The identity rule on an element-wise f: f(x) = x * (f(x) / x), the ratio held constant."""
    return x * (f(x) / x).detach()


def _layer_norm(x, w, b, eps):
    """LayerNorm with the identity rule on the normaliser: the std held constant, centering linear."""
    c = x - x.mean(-1, keepdim=True)
    return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps).detach() * w + b


def _rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach() * w


def _attention(q, k, v, causal):
    """q (H, N, d), k/v (H, N, d): softmax exact (Taylor rule), uniform rule on Q K^T and on P V."""
    s = _half(q) @ _half(k).transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return _half(torch.softmax(s, -1)) @ _half(v)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def llava_reference(model, input_ids, pixel_values, token):
    """(token relevance (N,), image maps (images, h, w), logits (N, V)) of logit[-1, token] for one row, in float64."""
    cfg, vc, tc = model.config, model.config.vision_config, model.config.text_config
    W = {k: v.double() for k, v in model.state_dict().items()}
    V, L = "model.vision_tower.", "model.language_model."
    # vision tower (CLIP): the patch embeddings are the leaf the image relevance is read at
    patches = F.conv2d(pixel_values.double(), W[V + "embeddings.patch_embedding.weight"], stride=vc.patch_size)
    patches.requires_grad_(True)
    n_img, D = patches.shape[:2]
    x = torch.cat([W[V + "embeddings.class_embedding"].expand(n_img, 1, D), patches.flatten(2).transpose(1, 2)], 1)
    x = x + W[V + "embeddings.position_embedding.weight"]
    x = _layer_norm(x, W[V + "pre_layrnorm.weight"], W[V + "pre_layrnorm.bias"], vc.layer_norm_eps)
    hidden = [x]
    hv = vc.num_attention_heads
    for i in range(vc.num_hidden_layers):
        p = f"{V}encoder.layers.{i}."
        lin = lambda t, name: t @ W[p + name + ".weight"].T + W[p + name + ".bias"]  # noqa: E731
        h = _layer_norm(x, W[p + "layer_norm1.weight"], W[p + "layer_norm1.bias"], vc.layer_norm_eps)
        heads = lambda t: t.view(n_img, -1, hv, D // hv).transpose(1, 2)  # noqa: E731
        o = _attention(heads(lin(h, "self_attn.q_proj")), heads(lin(h, "self_attn.k_proj")),
                       heads(lin(h, "self_attn.v_proj")), causal=False)
        x = x + lin(o.transpose(1, 2).reshape(n_img, -1, D), "self_attn.out_proj")
        h = _layer_norm(x, W[p + "layer_norm2.weight"], W[p + "layer_norm2.bias"], vc.layer_norm_eps)
        x = x + lin(_ratio_act(lin(h, "mlp.fc1"), lambda z: z * torch.sigmoid(1.702 * z)), "mlp.fc2")
        hidden.append(x)
    features = hidden[cfg.vision_feature_layer][:, 1:]         # "default": the CLS token dropped
    P = "model.multi_modal_projector."
    features = _ratio_act(features @ W[P + "linear_1.weight"].T + W[P + "linear_1.bias"], F.gelu)
    features = features @ W[P + "linear_2.weight"].T + W[P + "linear_2.bias"]
    # language model (Llama) on the merged embeddings: image features in the placeholders, in order
    e = W[L + "embed_tokens.weight"][input_ids]
    merged = e.masked_scatter((input_ids == LLAVA_IMAGE_TOKEN)[:, None], features.reshape(-1, e.shape[-1]))
    N, H, Hkv, hd = merged.shape[0], tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
    cos, sin = model.model.language_model.rotary_emb(merged[None].float(), torch.arange(N)[None])
    cos, sin = cos[0].double(), sin[0].double()
    rope = lambda t: t * cos + _rotate_half(t) * sin  # noqa: E731
    x = merged
    for i in range(tc.num_hidden_layers):
        p = f"{L}layers.{i}."
        lin = lambda t, name: t @ W[p + name + ".weight"].T  # noqa: E731
        h = _rms_norm(x, W[p + "input_layernorm.weight"], tc.rms_norm_eps)
        q = rope(lin(h, "self_attn.q_proj").view(N, H, hd).transpose(0, 1))
        k = rope(lin(h, "self_attn.k_proj").view(N, Hkv, hd).transpose(0, 1)).repeat_interleave(H // Hkv, 0)
        v = lin(h, "self_attn.v_proj").view(N, Hkv, hd).transpose(0, 1).repeat_interleave(H // Hkv, 0)
        x = x + lin(_attention(q, k, v, causal=True).transpose(0, 1).reshape(N, H * hd), "self_attn.o_proj")
        h = _rms_norm(x, W[p + "post_attention_layernorm.weight"], tc.rms_norm_eps)
        glu = _half(_ratio_act(lin(h, "mlp.gate_proj"), F.silu)) * _half(lin(h, "mlp.up_proj"))
        x = x + lin(glu, "mlp.down_proj")
    logits = _rms_norm(x, W[L + "norm.weight"], tc.rms_norm_eps) @ W["lm_head.weight"].T
    g_merged, g_patches = torch.autograd.grad(logits[-1, token], [merged, patches])
    return (merged * g_merged).sum(-1).detach(), (patches * g_patches).sum(1).detach(), logits.detach()


def test_llava_matches_float64_reference():
    model = build("llava", seed=3)
    x = inputs("llava", batch=1, length=7, seed=3)
    e = af.explain(model, **x, backend="torch")
    rel, maps, logits = llava_reference(model, x["input_ids"][0], x["pixel_values"], int(e.target_ids[0]))
    assert rel_err(model(**x).logits[0].detach(), logits) < 1e-5          # the reference computes the model
    assert rel_err(e.relevance[0], rel) < 1e-4
    assert len(e.image_relevance) == 1 and e.image_relevance[0].shape == (4, 4)
    assert rel_err(e.image_relevance[0], maps[0]) < 1e-4
    # a float64 model agrees to the float32 rounding of the returned relevance
    e64 = af.explain(copy.deepcopy(model).double(), **{**x, "pixel_values": x["pixel_values"].double()},
                     target=int(e.target_ids[0]), backend="torch")
    assert rel_err(e64.relevance[0], rel) < 1e-6 and rel_err(e64.image_relevance[0], maps[0]) < 1e-6


# --- patching and restoring --------------------------------------------------------------------------------------
def test_lrp_patches_every_part_and_restores_all_subconfigs():
    model = build("llava", seed=1)
    x = inputs("llava", seed=1)
    before = model(**x).logits.detach()
    attn = _subconfig_attn(model)
    with af.lrp(model) as handle:
        assert _subconfig_attn(model) == ("attnlrp_fast",) * 3
        names = handle.patched
        assert any(n.startswith("model.vision_tower.encoder.layers.0.mlp.activation_fn") for n in names)  # QuickGELU
        assert "model.vision_tower.pre_layrnorm" in names and "model.multi_modal_projector.act" in names
        assert names["model.language_model.layers.0.mlp"] == "glu_mlp"
        vision_attn = model.model.vision_tower.encoder.layers[0].self_attn
        assert vision_attn.attnlrp_fast_rule == "attnlrp" and vision_attn.is_causal is False
        assert rel_err(model(**x).logits.detach(), before) < 1e-4
    assert _subconfig_attn(model) == attn
    assert not any("forward" in m.__dict__ or hasattr(m, "attnlrp_fast_rule") for m in model.modules())
    assert torch.equal(model(**x).logits.detach(), before)


def test_lrp_restores_mixed_subconfig_attention():
    model = build("llava", seed=1)
    model.set_attn_implementation({"": "sdpa", "vision_config": "eager", "text_config": "sdpa"})
    attn = _subconfig_attn(model)
    af.lrp(model).remove()
    assert _subconfig_attn(model) == attn


def test_gamma_scope_is_the_vision_encoder_and_unknown_modules_are_refused():
    model = build("llava", seed=2)
    with af.lrp(model, gamma=0.25) as handle:
        gamma = [n for n, kind in handle.patched.items() if kind == "gamma_linear"]
        assert len(gamma) == 2 * 6 and all(n.startswith("model.vision_tower.encoder.layers.") for n in gamma)

    class SquaredMLP(torch.nn.Module):     # a log-sum-exp inline, no rule covers it, in the vision tower
        def __init__(self, mlp):
            super().__init__()
            self.inner = mlp

        def forward(self, x):
            return self.inner(x) * torch.logsumexp(x, dim=-1, keepdim=True)

    layer = model.model.vision_tower.encoder.layers[1]
    layer.mlp = SquaredMLP(layer.mlp)
    with pytest.raises(af.UnsupportedModelError, match=r"vision_tower.encoder.layers.1.mlp \(SquaredMLP\)"):
        af.lrp(model)
    assert model.config.vision_config._attn_implementation != "attnlrp_fast"


# --- explain --------------------------------------------------------------------------------------------------------
def test_explain_fields_shares_and_errors():
    model = build("llava", seed=4)
    x = inputs("llava", batch=2, seed=4)
    e = af.explain(model, **x, backend="torch")
    assert e.relevance.shape == x["input_ids"].shape and e.image_rows.tolist() == [0, 1]
    assert [m.shape for m in e.image_relevance] == [(4, 4), (4, 4)]
    assert all(m.dtype == torch.float32 and m.abs().sum() > 0 for m in e.image_relevance)
    assert torch.allclose(e.image_share + e.text_share, torch.ones(2), atol=1e-5)
    text = e.relevance.masked_fill(x["input_ids"] == LLAVA_IMAGE_TOKEN, 0).sum(-1)
    images = torch.stack([m.sum() for m in e.image_relevance])
    assert torch.allclose(e.image_share, images / (images + text), atol=1e-6)
    # gradient x input is another explanation, on the image and on the text
    g = af.explain(model, **x, rule="grad", target=e.target_ids, backend="torch")
    assert rel_err(g.relevance, e.relevance) > 0.05
    assert rel_err(torch.stack(g.image_relevance), torch.stack(e.image_relevance)) > 0.05
    # rows are independent: row 1 alone gives row 1's relevance
    alone = af.explain(model, input_ids=x["input_ids"][1:], pixel_values=x["pixel_values"][1:], backend="torch")
    assert rel_err(alone.image_relevance[0], e.image_relevance[1]) < 1e-4
    # checkpointed layers and chunked MLPs (af.low_memory) give the same (no KV cache grows in the recompute)
    low = af.explain(model, **x, backend="torch", checkpoint=True, mlp_chunk=4)
    assert rel_err(low.relevance, e.relevance) < 1e-5
    assert rel_err(torch.stack(low.image_relevance), torch.stack(e.image_relevance)) < 1e-5
    with pytest.raises(ValueError, match="vision-language model: pass input_ids"):
        af.explain(model, pixel_values=x["pixel_values"])
    with pytest.raises(ValueError, match="no pixel_values were given"):
        af.explain(model, input_ids=x["input_ids"])
    plain = x["input_ids"].masked_fill(x["input_ids"] == LLAVA_IMAGE_TOKEN, 5)
    text_only = af.explain(model, input_ids=plain, backend="torch")    # a VLM on text alone: no image fields
    assert text_only.image_relevance is None and torch.isfinite(text_only.relevance).all()


def test_siglip_tower():
    torch.manual_seed(0)
    model = llava(vision="siglip", vision_feature_layer=-1).eval()
    x = inputs("llava", batch=1, seed=5)
    with af.lrp(model, backend="torch") as handle:
        assert "siglip_vision" in handle.family.name
        e = af.explain(model, **x)
    assert e.image_relevance[0].shape == (4, 4) and torch.isfinite(e.image_relevance[0]).all()
    assert abs(float(e.image_share[0] + e.text_share[0]) - 1) < 1e-5


@needs_interpreter
def test_backends_agree_on_llava():
    model = build("llava", seed=6)
    x = inputs("llava", batch=1, length=5, seed=6)
    a = af.explain(model, **x, backend="triton")
    b = af.explain(model, **x, backend="torch")
    assert rel_err(a.relevance, b.relevance) < 1e-4
    assert rel_err(a.image_relevance[0], b.image_relevance[0]) < 1e-4


def test_the_patch_the_answer_depends_on_gets_the_relevance():
    """By construction the answer reads one image patch, grid cell (1, 3) (row 1, column 3: a transposed or
    mis-flattened grid would point elsewhere): the image features are taken before the vision tower mixes patches
    (vision_feature_layer -3: the embeddings after pre_layrnorm) and the attention mask hides every other image
    placeholder from the language model. Blanking that patch moves the logit, blanking any other does not (checked);
    that patch holds all the image relevance."""
    model = build("llava", seed=7)
    model.config.vision_feature_layer = -3     # of 3 hidden states: the embeddings
    x = inputs("llava", batch=1, seed=7)
    mask = torch.ones_like(x["input_ids"])
    mask[0, 3:19] = 0                     # the image's 16 placeholders, row-major over the 4 x 4 grid
    mask[0, 3 + 1 * 4 + 3] = 1
    e = af.explain(model, **x, attention_mask=mask, backend="torch")
    token = int(e.target_ids[0])

    def logit(px):
        with torch.no_grad():
            return float(model(input_ids=x["input_ids"], attention_mask=mask, pixel_values=px).logits[0, -1, token])

    base, change = logit(x["pixel_values"]), torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            blank = x["pixel_values"].clone()
            blank[..., 4 * i:4 * i + 4, 4 * j:4 * j + 4] = 0
            change[i, j] = abs(logit(blank) - base)
    assert change[1, 3] > 1e-3 and change.flatten().topk(2).values[1] < 1e-6    # the answer depends on that patch
    r = e.image_relevance[0].abs()
    assert divmod(int(r.argmax()), 4) == (1, 3) and r.flatten().topk(2).values[1] < 1e-6 * r.max()


# --- the command: explain --image ----------------------------------------------------------------------------------
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """A tiny LLaVA saved with a processor built here (CLIP image processor, a local BPE tokenizer with an <image>
    token, a chat template for image + text turns), and a generated PNG."""
    import numpy as np
    import transformers as tf
    from PIL import Image

    from attnlrp_fast.app.tiny import make_tokenizer

    folder = tmp_path_factory.mktemp("llava")
    tok = make_tokenizer(vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    processor = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tok, patch_size=4, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=CHAT)
    torch.manual_seed(0)
    model = llava(text=(tf.LlamaConfig, {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                                         "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}))
    model.config.image_token_id = image_id
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0       # an answer that does not end at once
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    Image.fromarray((np.random.default_rng(0).random((24, 20, 3)) * 255).astype("uint8")).save(folder / "photo.png")
    return folder


def test_cli_explain_image_end_to_end(llava_folder, tmp_path, capsys):
    import json

    from attnlrp_fast.app import cli

    out = tmp_path / "report"
    photo = str(llava_folder / "photo.png")
    rc = cli.main(["explain", "--model", str(llava_folder), "--image", photo, "--image", photo, "--question",
                   "What is in the picture?", "--out", str(out), "--max-new-tokens", "3", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "top image regions" in printed and "top words" in printed and "image 1 cell" in printed
    data = json.loads((out / "explanation.json").read_text())
    assert len(data["image_maps"]) == 2 and all(len(m) == 4 and len(m[0]) == 4 for m in data["image_maps"])
    assert abs(data["image_share"] + data["text_share"] - 1) < 1e-5
    assert data["image_tokens"] == 32 and len(data["relevance"]) == len(data["tokens"]) == data["prompt_tokens"]
    page = (out / "explanation.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "What" in page
    assert (out / "overlay_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "overlay_1.png").exists()


def test_cli_explain_image_through_a_reasoning_span(llava_folder, tmp_path, capsys):
    """--reasoning START:END with --image: the answer after the span is explained, the overlays, words and shares are
    all hops together, and the JSON lists what each hop put on the images."""
    import json

    from attnlrp_fast.app import cli

    out = tmp_path / "report"
    rc = cli.main(["explain", "--model", str(llava_folder), "--image", str(llava_folder / "photo.png"), "--question",
                   "What is in the picture?", "--answer", "a cat on a mat", "--reasoning", "0:2", "--hops", "2",
                   "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads((out / "explanation.json").read_text())
    r = data["reasoning"]
    assert r["hops"] == 2 and len(r["share_left_in_reasoning"]) == len(r["image_relevance_per_hop"]) == 3
    assert r["span"][1] - r["span"][0] == 2 and r["source"] == "--reasoning 0:2"
    total = sum(sum(row) for m in data["image_maps"] for row in m)
    assert total == pytest.approx(sum(r["image_relevance_per_hop"]), rel=1e-4, abs=1e-6)
    assert abs(data["image_share"] + data["text_share"] - 1) < 1e-5
    assert "hop 2:" in printed and "all hops together" in printed
    assert len(data["target_logits"]) == len(data["answer_token_ids"]) - 2


def test_cli_explain_image_errors_are_one_line(llava_folder, tmp_path, capsys):
    from attnlrp_fast.app import cli
    from attnlrp_fast.app.tiny import make_model

    photo = str(llava_folder / "photo.png")
    (tmp_path / "notes.png").write_text("not an image")
    text_model = make_model(tmp_path / "text-llama", layers=1, hidden=32)
    cases = [
        (["--model", str(llava_folder), "--image", str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["--model", str(llava_folder), "--image", str(tmp_path / "notes.png")], "not an image"),
        (["--model", str(text_model), "--image", photo], "has no vision tower"),
        (["--model", str(llava_folder)] + ["--image", photo] * 8, "more than the context"),   # 8 x 16 image tokens
    ]
    for args, message in cases:
        rc = cli.main(["explain", *args, "--question", "What?", "--out", str(tmp_path / "o"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, err


# --- Gemma 3: image-token blocks that attend both ways (the engine's per-query key limits) ------------------------
@needs_interpreter
def test_gemma3_explains_images_with_their_blocks_on_both_backends():
    model, side = _gemma3(["full_attention", "sliding_attention"])
    with torch.no_grad():       # transformers initialises the projection to zero: no image would reach the text
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3,
                                                                             generator=torch.Generator().manual_seed(5))
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(3, 60, (1, 15), generator=torch.Generator().manual_seed(2))
    ids[0, 4:8] = IMAGE
    pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(6))
    types = (ids == IMAGE).long()
    before = model(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits
    got = {b: af.explain(model, input_ids=ids, pixel_values=pixels, token_type_ids=types, backend=b)
           for b in ("torch", "triton")}
    a, b = got["torch"], got["triton"]
    assert rel_err(a.relevance, b.relevance) < 1e-4 and rel_err(a.image_relevance[0], b.image_relevance[0]) < 1e-4
    assert a.image_relevance[0].shape == (2, 2) and a.image_relevance[0].abs().sum() > 0
    assert abs(float(a.image_share[0] + a.text_share[0]) - 1) < 1e-5 and float(a.image_share[0]) != 0
    # without token types the image tokens attend causally only: another computation, another relevance
    causal_only = af.explain(model, input_ids=ids, pixel_values=pixels, backend="torch")
    assert rel_err(causal_only.relevance, a.relevance) > 1e-4
    assert torch.equal(model(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits, before)


# --- Qwen2-VL / Qwen2.5-VL: flattened (t, h, w) patches in spatial-merge windows, M-RoPE ---------------------------
def _qwen(version, seed=0):
    torch.manual_seed(seed)
    model = qwen_vl(version).eval()
    with torch.no_grad():       # as build(): no rule tested on zero biases or unit norm weights
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _mm_types(x):
    return {**x, "mm_token_type_ids": (x["input_ids"] == QWEN_VL_IMAGE_TOKEN).int()}


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_vl_lrp_patches_every_part_and_restores(version):
    model = _qwen(version, seed=1)
    x = _mm_types(qwen_vl_inputs(seed=1))
    before = model(**x).logits.detach()
    attn = _subconfig_attn(model)
    with af.lrp(model) as handle:
        assert _subconfig_attn(model) == ("attnlrp_fast",) * 3
        names = handle.patched
        norm = "layer_norm" if version == "2" else "rms_norm"
        assert names["model.visual.blocks.0.norm1"] == norm and names["model.visual.merger.ln_q"] == norm
        assert names["model.visual.merger.mlp.1"] == "activation"                      # the merger's GELU
        if version == "2":
            assert names["model.visual.blocks.1.mlp.act"] == "activation"               # QuickGELU
        else:
            assert names["model.visual.blocks.1.mlp"] == "glu_mlp"                      # SiLU GLU
        assert names["model.language_model.layers.0.mlp"] == "glu_mlp"
        assert names["model.language_model.layers.1.input_layernorm"] == "rms_norm"
        vision_attn = model.model.visual.blocks[0].attn
        assert vision_attn.attnlrp_fast_rule == "attnlrp" and vision_attn.is_causal is False
        assert rel_err(model(**x).logits.detach(), before) < 1e-4
    assert _subconfig_attn(model) == attn
    assert not any("forward" in m.__dict__ or hasattr(m, "attnlrp_fast_rule") for m in model.modules())
    assert torch.equal(model(**x).logits.detach(), before)
    model.set_attn_implementation({"": "sdpa", "vision_config": "eager", "text_config": "sdpa"})
    mixed = _subconfig_attn(model)
    af.lrp(model).remove()
    assert _subconfig_attn(model) == mixed == ("sdpa", "eager", "sdpa")

    class SquaredMLP(torch.nn.Module):     # an MLP with a nonlinearity no map knows, in the vision tower
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * torch.logsumexp(x, dim=-1, keepdim=True)

    model.model.visual.blocks[1].mlp = SquaredMLP(model.model.visual.blocks[1].mlp)
    with pytest.raises(af.UnsupportedModelError, match=r"visual.blocks.1.mlp \(SquaredMLP\)"):
        af.lrp(model)
    assert _subconfig_attn(model) == mixed


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_vl_explain_maps_shares_and_rows(version):
    """Three images of different grids, two in row 0 and one in row 1 (8 placeholders per row)."""
    model = _qwen(version, seed=4)
    x = qwen_vl_inputs(grids=((4, 4), (4, 4), (4, 8)), row_of=(0, 0, 1), seed=4)
    e = af.explain(model, **x, backend="torch")
    assert e.relevance.shape == x["input_ids"].shape and torch.isfinite(e.relevance).all()
    assert [tuple(m.shape) for m in e.image_relevance] == [(4, 4), (4, 4), (4, 8)]    # (h, w) of image_grid_thw
    assert all(torch.isfinite(m).all() and m.abs().sum() > 0 for m in e.image_relevance)
    assert e.image_rows.tolist() == [0, 0, 1]
    assert torch.allclose(e.image_share + e.text_share, torch.ones(2), atol=1e-5)
    text = e.relevance.masked_fill(x["input_ids"] == QWEN_VL_IMAGE_TOKEN, 0).sum(-1)
    images = torch.stack([e.image_relevance[0].sum() + e.image_relevance[1].sum(), e.image_relevance[2].sum()])
    assert torch.allclose(e.image_share, images / (images + text), atol=1e-5)
    g = af.explain(model, **x, rule="grad", target=e.target_ids, backend="torch")
    assert rel_err(g.relevance, e.relevance) > 0.05
    assert rel_err(torch.cat([m.flatten() for m in g.image_relevance]),
                   torch.cat([m.flatten() for m in e.image_relevance])) > 0.05
    # row 1 alone (its image's patches alone) gives row 1's relevance and map
    alone = af.explain(model, input_ids=x["input_ids"][1:], pixel_values=x["pixel_values"][32:],
                       image_grid_thw=x["image_grid_thw"][2:], backend="torch")
    assert rel_err(alone.relevance[0], e.relevance[1]) < 1e-4
    assert rel_err(alone.image_relevance[0], e.image_relevance[2]) < 1e-4
    with pytest.raises(ValueError, match="flattened patches"):
        af.explain(model, input_ids=x["input_ids"], pixel_values=torch.randn(1, 3, 8, 8),
                   image_grid_thw=x["image_grid_thw"])


def _cell_image(h, w, patch, mark=None):
    """An (h * patch, w * patch) uint8 image whose every pixel of grid cell (i, j) holds i * w + j (+ 100 in the
    cell `mark`)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h * patch, 0:w * patch]
    cell = (y // patch) * w + x // patch
    if mark is not None:
        cell[(y // patch == mark[0]) & (x // patch == mark[1])] += 100
    return Image.fromarray(np.stack([cell] * 3, -1).astype(np.uint8))


def test_qwen_vl_grid_order_matches_the_processor_and_the_model():
    """The map from (h, w) cells to rows of pixel_values, against the image processor's own patch order (a
    constructed image whose cell (i, j) holds i * w + j), the vision tower's rotary position ids, and the patch
    embedding: changing the pixels of one cell changes the embedding only at the row the map gives that cell."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.vision_utils import get_vision_position_ids

    from attnlrp_fast.models.qwen2_vl import image_maps, patch_order

    h, w, patch = 4, 6, 2
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2, do_resize=False,
                                         do_rescale=False, do_normalize=False)
    out = processor(images=_cell_image(h, w, patch), return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, h, w]]
    order = patch_order(1, h, w, 2)[0]
    cells = out["pixel_values"][:, 0].long()            # each row is one patch: constant, its cell's number
    assert (out["pixel_values"] == out["pixel_values"][:, :1]).all()
    assert torch.equal(cells[order], torch.arange(h * w).view(h, w))
    assert not torch.equal(order, torch.arange(h * w).view(h, w))       # the row-major order would be another
    # the vision tower's rotary positions of row order[i, j] are (i, j)
    ids = get_vision_position_ids(out["image_grid_thw"], 2)
    assert torch.equal(ids[order.flatten()], torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w),
                                                                        indexing="ij"), -1).reshape(-1, 2))
    # one changed cell changes the patch embedding at one row, the one the map gives it
    model = _qwen("2", seed=2)
    marked = processor(images=_cell_image(h, w, patch, mark=(1, 4)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embed = model.model.visual.patch_embed
        changed = (embed(marked) - embed(out["pixel_values"])).abs().amax(-1) > 0
    assert changed.nonzero().flatten().tolist() == [int(order[1, 4])]
    # and image_maps puts that row's relevance in cell (1, 4), summing the temporal patches of a 2-frame grid
    one_hot = torch.zeros(2 * h * w)
    one_hot[int(order[1, 4])] = 1.0
    one_hot[h * w + int(order[1, 4])] = 2.0
    maps, counts = image_maps(one_hot, torch.tensor([[2, h, w]]), 2)
    assert counts == [2 * h * w // 4] and maps[0][1, 4] == 3.0 and maps[0].sum() == 3.0


@needs_interpreter
def test_backends_agree_on_qwen2_5_vl():
    model = _qwen("2.5", seed=6)
    x = qwen_vl_inputs(grids=((4, 4),), length=4, seed=6)
    a = af.explain(model, **x, backend="triton")
    b = af.explain(model, **x, backend="torch")
    assert rel_err(a.relevance, b.relevance) < 1e-4
    assert rel_err(a.image_relevance[0], b.image_relevance[0]) < 1e-4
