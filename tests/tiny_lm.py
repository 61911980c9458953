"""A tiny random causal LM with a real (byte-level BPE) tokenizer, saved to a local folder: what the CLI tests
load with --model. Built from config classes and a tokenizer trained in milliseconds; no download."""

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CORPUS = ["The reservoir was built in 1931 after a dry summer.", "A valve failed during the storm in March.",
          "Runoff from the farms reached the intake; the water tasted of soil.", "pH < 6.5 & turbidity > 1 NTU.",
          "Zoë Müller measured 14 °C at the outlet. Budgets rose by 4 percent."] * 20


DOC = ("Harrowfield water report.\n\nThe reservoir was built in 1931 after a dry summer. Zoë Müller measured "
       "14 °C at the outlet.\n\nA valve failed during the storm in March; runoff from the farms reached the intake "
       "and pH < 6.5 & turbidity > 1 NTU were logged.\n\nBudgets rose by 4 percent.\n")   # the `doc` fixture's text


def make_tokenizer(vocab_size=300, chat=True):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                      pad_token="<|pad|>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_local_lm(path, *, chat=True, max_positions=4096, seed=0, layers=2, hidden=32, family="llama", window=None):
    """Save a tiny random causal LM and its tokenizer in `path`; returns (model, tokenizer). family "mistral" takes
    a sliding `window`."""
    tokenizer = make_tokenizer(chat=chat)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                  max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if family == "mistral":
        common["sliding_window"] = window
    config = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[family](**common)
    model = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
             "mistral": tf.MistralForCausalLM}[family](config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        # never generate the end token, so greedy answers are not empty
        model.lm_head.weight[tokenizer.eos_token_id] = 0
        if model.lm_head.bias is not None:
            model.lm_head.bias[tokenizer.eos_token_id] = -100
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def make_local_t5(path, *, seed=0):
    """Save a tiny random Flan-T5-style encoder-decoder (gated GELU) and its tokenizer (no chat template) in `path`;
    returns (model, tokenizer)."""
    tokenizer = make_tokenizer(chat=False)
    torch.manual_seed(seed)
    config = tf.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                         num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=64,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                         decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = tf.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0   # never the end token: the greedy answer is not empty
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer
