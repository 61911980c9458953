"""A tiny causal LM built here, with no download: `attnlrp-fast explain --model tiny` and `attnlrp-fast make-model
DIR`. A 2-layer Llama with random weights (fixed seed) and a byte-level BPE tokenizer trained in a fraction of a
second on the shipped sample report, with a chat template. Its answers are noise: it is for trying the command
and its reports end to end, not for reading the explanation.
"""

NAME = "tiny"     # the --model value that builds this model (unless a folder of that name exists)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]


def make_tokenizer(vocab_size=1024):
    """A fast byte-level BPE tokenizer (any text encodes) trained on the shipped sample document."""
    from importlib.resources import files

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (files("attnlrp_fast") / "data" / "sample_document.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                                pad_token="<|pad|>", model_max_length=8192)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(path, *, layers=2, hidden=64, max_positions=8192, seed=0):
    """Save the tiny Llama and its tokenizer in the folder `path` (created); returns the path."""
    from pathlib import Path

    import torch
    import transformers

    tokenizer = make_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():          # larger than the init's 0.02: answers that vary with the input
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.lm_head.weight[tokenizer.eos_token_id] = 0   # never the end token at once: answers are not empty
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
