"""Tiny random HuggingFace models of every supported family, built from config classes (no download)."""

import torch
import transformers as tf

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _decoder(config_cls, model_cls, **extra):
    return lambda: model_cls(config_cls(**{**COMMON, **extra}))


LLAVA_IMAGE_TOKEN = VOCAB - 1   # the image placeholder id, inside the vocabulary
LLAVA_IMAGE = 16                # image side in pixels; patch 4: a 4 x 4 grid, 16 placeholder tokens per image


def llava(vision="clip", vision_feature_layer=-2, text=(tf.LlamaConfig, {})):
    """A tiny LLaVA: CLIP (QuickGELU, CLS token) or SigLIP (GELU-tanh) vision tower, projector, Llama (or `text`)."""
    tower = dict(image_size=LLAVA_IMAGE, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4)
    vision_config = tf.CLIPVisionConfig(**tower) if vision == "clip" else tf.SiglipVisionConfig(**tower)
    text_config = text[0](**{**COMMON, **text[1]})
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=LLAVA_IMAGE_TOKEN,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default" if vision == "clip"
        else "full", image_seq_length=16))


BUILDERS = {
    "llama": _decoder(tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": _decoder(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=5),
    "mixtral": _decoder(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": _decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": _decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM),
    "gemma": _decoder(tf.GemmaConfig, tf.GemmaForCausalLM, hidden_activation="gelu_pytorch_tanh"),
    "gemma2": _decoder(tf.Gemma2Config, tf.Gemma2ForCausalLM, sliding_window=5, attn_logit_softcapping=5.0,
                       final_logit_softcapping=3.0, query_pre_attn_scalar=16),
    "gemma3_text": _decoder(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, sliding_window=5, query_pre_attn_scalar=16,
                            final_logit_softcapping=3.0),
    "phi3": _decoder(tf.Phi3Config, tf.Phi3ForCausalLM),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=128, num_labels=3)),
    "bert_mlm": lambda: tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=128)),
    "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=130, num_labels=2, pad_token_id=1)),
    "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_labels=5)),
    "llava": llava,
}

CAUSAL_LMS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2")


def build(name, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval().to(dtype)
    # Random init leaves Gemma's norm weights at 0 and some biases at 0: perturb every parameter so that
    # no rule is tested on a degenerate model.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def inputs(name, batch=2, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    if name == "llava":   # text, one image's 16 placeholder tokens, text: length + 16 tokens per row
        text = torch.randint(2, LLAVA_IMAGE_TOKEN, (batch, length), generator=g)
        image = torch.full((batch, 16), LLAVA_IMAGE_TOKEN)
        return {"input_ids": torch.cat([text[:, :3], image, text[:, 3:]], 1),
                "pixel_values": torch.randn(batch, 3, LLAVA_IMAGE, LLAVA_IMAGE, generator=g)}
    return {"input_ids": torch.randint(2, VOCAB, (batch, length), generator=g)}


QWEN_VL_IMAGE_TOKEN = VOCAB - 1   # inside the vocabulary
QWEN_VL_PATCH = 2                 # patch side; temporal_patch_size 2, spatial_merge_size 2


def qwen_vl(version="2"):
    """A tiny Qwen2-VL ("2": LayerNorm, QuickGELU MLP) or Qwen2.5-VL ("2.5": RMSNorm, SiLU GLU, windowed
    attention in block 0, full in block 1): vision depth 2, embed_dim 32, 4 heads; a 2-layer Qwen2 text model."""
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(depth=2, hidden_size=32, num_heads=4, in_channels=3, patch_size=QWEN_VL_PATCH, spatial_merge_size=2,
                  temporal_patch_size=2)
    if version == "2":
        config = tf.Qwen2VLConfig(text_config=text, vision_config={**vision, "embed_dim": 32, "mlp_ratio": 2},
                                  image_token_id=QWEN_VL_IMAGE_TOKEN)
        return tf.Qwen2VLForConditionalGeneration(config)
    config = tf.Qwen2_5_VLConfig(text_config=text, image_token_id=QWEN_VL_IMAGE_TOKEN, vision_config={
        **vision, "intermediate_size": 48, "out_hidden_size": 32, "window_size": 4 * QWEN_VL_PATCH,
        "fullatt_block_indexes": [1]})
    return tf.Qwen2_5_VLForConditionalGeneration(config)


def qwen_vl_inputs(grids=((4, 6),), length=7, seed=0, row_of=None):
    """input_ids (B, N): per row 3 text tokens, then each of its images as a text token and the image's h * w / 4
    placeholders (images apart, as the processor's vision start tokens keep them), then text up to one length;
    pixel_values (patches, 3*2*P*P) and image_grid_thw (images, 3) = (1, h, w) per image. One row per image unless
    row_of maps images to rows."""
    g = torch.Generator().manual_seed(seed)
    row_of = list(range(len(grids))) if row_of is None else list(row_of)
    parts = [[] for _ in range(max(row_of) + 1)]
    for (h, w), r in zip(grids, row_of):
        parts[r] += [torch.randint(3, QWEN_VL_IMAGE_TOKEN, (1,), generator=g), torch.full((h * w // 4,),
                                                                                         QWEN_VL_IMAGE_TOKEN)]
    longest = max(sum(len(p) for p in row) for row in parts)
    rows = []
    for row in parts:
        n = sum(len(p) for p in row)
        text = torch.randint(3, QWEN_VL_IMAGE_TOKEN, (length + longest - n,), generator=g)
        rows.append(torch.cat([text[:3], *row, text[3:]]))
    patches = sum(h * w for h, w in grids)
    return {"input_ids": torch.stack(rows),
            "pixel_values": torch.randn(patches, 3 * 2 * QWEN_VL_PATCH ** 2, generator=g),
            "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids])}


GEMMA3_IMAGE = 70   # the image token of gemma3_with_images


def gemma3_with_images(layer_types, window=16, tokens_per_image=4):
    """A tiny Gemma 3 with a SigLIP tower (image token GEMMA3_IMAGE); returns (model, image side in pixels)."""
    torch.manual_seed(0)
    text = tf.Gemma3TextConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=len(layer_types),
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                               sliding_window=window, query_pre_attn_scalar=8, layer_types=layer_types)
    side = int(tokens_per_image ** 0.5) * 4
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   image_size=side, patch_size=4)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                             image_token_index=GEMMA3_IMAGE, boi_token_index=71, eoi_token_index=72)
    return tf.Gemma3ForConditionalGeneration(config).eval(), side
