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
