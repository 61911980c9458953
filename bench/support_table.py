"""Which model families af.explain() supports: every causal-LM and seq2seq architecture registered in the installed
transformers, built tiny from its own config class with shrunk sizes and random weights, then explained.

    python bench/support_table.py                      # all, writes bench/support.json and bench/SUPPORT.md
    python bench/support_table.py llama phi t5         # some model types, printed

Each architecture ends in one of:
  explains   af.explain ran: relevance finite, not equal to gradient x input, the model restored afterwards
  refused    a one-line error naming the module and the reason (UnsupportedModelError, NotImplementedError)
  crash      any other exception: a defect
  unbuilt    the tiny model could not be built from its config alone (it needs a checkpoint, a sub-model, a
             tokenizer, a package that is not installed): not counted
"""

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
import traceback
import warnings

# Sizes set on every config attribute of these names that the config has (nested sub-configs too).
SHRINK = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "n_embed": 32, "embed_dim": 32, "dim": 32, "model_dim": 32,
    "intermediate_size": 48, "ffn_dim": 48, "d_ff": 48, "n_inner": 48, "ffn_hidden_size": 48, "inner_hidden_size": 48,
    "decoder_ffn_dim": 48, "encoder_ffn_dim": 48, "hidden_dim": 48, "mlp_dim": 48, "intermediate_dim": 48,
    "moe_intermediate_size": 24, "shared_expert_intermediate_size": 24, "expert_intermediate_size": 24,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_decoder_layers": 2, "num_encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2,
    "head_dim": 8, "d_kv": 8, "kv_channels": 8, "attention_head_dim": 8,
    "vocab_size": 128, "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "top_k": 2,
    "n_group": 1, "topk_group": 1, "num_shared_experts": 1, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "sliding_window": 16, "attention_window": 16,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
    "num_buckets": 8, "rotary_dim": 4, "partial_rotary_factor": 0.5,
}
SEQ_LEN = 9
KINDS = ("causal-lm", "seq2seq")


def architectures():
    """[(model_type, kind)] for every causal-LM and seq2seq-LM architecture transformers registers."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    seq2seq = set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    found = [(t, "causal-lm") for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in seq2seq]
    return found + [(t, "seq2seq") for t in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES]


def shrink(config, depth=0):
    """Set SHRINK's sizes on the config and its sub-configs (in place); keep what the config derives consistent."""
    for key, value in SHRINK.items():
        if key in ("partial_rotary_factor",) and not hasattr(config, key):
            continue
        current = getattr(config, key, None)
        if isinstance(current, bool) or (current is not None and not isinstance(current, (int, float))):
            continue
        if hasattr(config, key) and current is not None:
            try:
                setattr(config, key, value)
            except Exception:   # a read-only property derived from others
                pass
    for key in ("layer_types", "layers_block_type", "block_types", "mlp_layer_types"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and value:
            kinds = list(dict.fromkeys(value))   # one layer of each kind the full model has (hybrids: attention too)
            layers = max(2, len(kinds))
            try:
                setattr(config, key, (kinds * layers)[:layers])
                for k in ("num_hidden_layers", "n_layer", "num_layers"):
                    if isinstance(getattr(config, k, None), int):
                        setattr(config, k, layers)
            except Exception:
                pass
    if getattr(config, "kv_lora_rank", None) and hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = config.num_attention_heads   # multi-head latent attention: one K/V per head
    for key in ("use_cache",):
        if hasattr(config, key):
            setattr(config, key, False)
    if depth < 2:
        for name in list(getattr(config, "sub_configs", {}) or {}):
            sub = getattr(config, name, None)
            if sub is not None and hasattr(sub, "to_dict"):
                shrink(sub, depth + 1)
    return config


def build(model_type, kind):
    """The tiny model (eval mode, float32, seed 0), or raise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    config = shrink(AutoConfig.for_model(model_type))
    torch.manual_seed(0)
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(config, attn_implementation="eager")
    n = sum(p.numel() for p in model.parameters())
    if n > 20_000_000:
        raise RuntimeError(f"still {n / 1e6:.0f}M parameters after shrinking")
    model = model.float().eval()
    ids, extra = inputs_for(model, kind)
    with torch.no_grad():
        model(input_ids=ids, **extra)   # a shrunk config the model's own eager forward cannot run is not built
    return model


def inputs_for(model, kind):
    import torch
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, 100), (1, SEQ_LEN), generator=g)
    extra = {}
    if kind == "seq2seq" and getattr(model.config, "is_encoder_decoder", False):
        extra["decoder_input_ids"] = torch.randint(3, min(vocab, 100), (1, 5), generator=g)
    return ids, extra


def check(model_type, kind):
    """{"model_type", "kind", "status", "reason", "class", "seconds"} for one architecture."""
    import torch
    import attnlrp_fast as af
    from attnlrp_fast.models import UnsupportedModelError
    t0 = time.perf_counter()
    row = {"model_type": model_type, "kind": kind}
    try:
        model = build(model_type, kind)
    except BaseException as exc:   # noqa: BLE001 (anything a config class can throw)
        return {**row, "status": "unbuilt", "reason": _line(exc), "seconds": round(time.perf_counter() - t0, 2)}
    row["class"] = type(model).__name__
    try:
        ids, extra = inputs_for(model, kind)
        with torch.no_grad():
            before = _logits(model(input_ids=ids, **extra))
        attn_before = model.config._attn_implementation
        e = af.explain(model, ids, backend="torch", **extra)
        with torch.no_grad():
            after = _logits(model(input_ids=ids, **extra))
        problems = []
        rel = e.relevance
        if not torch.isfinite(rel).all():
            problems.append("relevance not finite")
        g = af.explain(model, ids, rule="grad", backend="torch", **extra).relevance
        if torch.allclose(rel, g, rtol=1e-4, atol=1e-6):
            problems.append("relevance equals gradient x input")
        if model.config._attn_implementation != attn_before or not torch.equal(before, after):
            problems.append("model not restored")
        if problems:
            row.update(status="crash", reason="; ".join(problems))
        else:
            row.update(status="explains", reason="")
    except (UnsupportedModelError, NotImplementedError) as exc:
        row.update(status="refused", reason=_line(exc))
    except BaseException as exc:   # noqa: BLE001
        row.update(status="crash", reason=_line(exc), where=traceback.format_exc(limit=-3))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def _line(exc):
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _check_star(args):
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(1)
    return check(*args)


def run(types=None, processes=2, timeout=120):
    """Rows for `types` (model types; None: every architecture), each in a worker process (one crash cannot take the
    others down; a hang is cut after `timeout` seconds)."""
    wanted = [a for a in architectures() if types is None or a[0] in types]
    rows = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, maxtasksperchild=8) as pool:
        pending = [(a, pool.apply_async(_check_star, (a,))) for a in wanted]
        for (model_type, kind), result in pending:
            try:
                rows.append(result.get(timeout=timeout))
            except multiprocessing.TimeoutError:
                rows.append({"model_type": model_type, "kind": kind, "status": "crash",
                             "reason": f"no answer in {timeout} s", "seconds": timeout})
            except Exception as exc:   # noqa: BLE001 (a worker that died)
                rows.append({"model_type": model_type, "kind": kind, "status": "crash", "reason": _line(exc)})
    return rows


def summary(rows):
    counts = {s: sum(r["status"] == s for r in rows) for s in ("explains", "refused", "crash", "unbuilt")}
    built = counts["explains"] + counts["refused"] + counts["crash"]
    counts["built"] = built
    counts["explained_share"] = round(counts["explains"] / built, 3) if built else math.nan
    return counts


def markdown(rows, meta):
    s = summary(rows)
    lines = ["# Model families: what af.explain() supports", "",
             f"Generated by `python bench/support_table.py` from transformers {meta['transformers']} "
             f"({meta['date']}): every causal-LM and seq2seq architecture it registers, built tiny from its own config "
             "class (2 layers, hidden size 32, random weights) and explained with the torch backend. "
             "`explains`: finite relevance, not equal to gradient x input, the model restored afterwards; "
             "`refused`: the one-line error the user gets; `unbuilt`: no tiny model could be built from the config "
             "alone (not counted).", "",
             f"**{s['explains']} of {s['built']} built architectures explain "
             f"({100 * s['explained_share']:.0f} %), {s['refused']} are refused, {s['crash']} crash**; "
             f"{s['unbuilt']} could not be built.", "",
             "| model type | kind | model class | status | reason |", "|---|---|---|---|---|"]
    order = {"crash": 0, "refused": 1, "explains": 2, "unbuilt": 3}
    for r in sorted(rows, key=lambda r: (order[r["status"]], r["kind"], r["model_type"])):
        reason = r.get("reason", "").replace("|", "\\|")
        lines.append(f"| {r['model_type']} | {r['kind']} | {r.get('class', '')} | {r['status']} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types to check (default: all)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "support.json"))
    parser.add_argument("--markdown", default=os.path.join(os.path.dirname(__file__), "SUPPORT.md"))
    args = parser.parse_args(argv)
    rows = run(args.types or None, processes=args.processes)
    if args.types:
        for r in rows:
            print(f"{r['model_type']:28s} {r['status']:9s} {r.get('reason', '')[:200]}")
            if r.get("where") and r["status"] == "crash":
                print("    " + r["where"].replace("\n", "\n    "))
        print(summary(rows))
        return 0
    import transformers
    meta = {"transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "summary": summary(rows), "rows": rows}, f, indent=1)
    with open(args.markdown, "w") as f:
        f.write(markdown(rows, meta))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
