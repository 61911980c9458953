"""End to end: one AttnLRP explanation of a Llama-3-8B-shaped model (random weights, no download), attnlrp-fast
against the LXT-style baseline on the same device in the same run.

  forward        a plain inference forward (SDPA, no grad, logits at the last position): the unit for the
                 ratio explanation time / forward time
  lxt_style      attnlrp_fast/baselines/lxt_style.py: SDPA with scaled gradients, Python rules on norms and MLPs,
                 HF gradient checkpointing (the reference implementation's approach)
  attnlrp_fast   af.explain(checkpoint=True): fused kernels, every layer checkpointed, MLP in 1024-token chunks;
                 attention as backend auto picks it (on CUDA: torch's SDPA kernels where the dispatch table says so)
  attnlrp_fast_triton   the same with backend="triton": attention on the Triton kernels throughout (to become the
                 default, this has to beat the LXT-style baseline)
  attnlrp_fast_offload  with --offload, at the last size (or at --offload-tokens, after a forward and a plain
                 attnlrp_fast row there), after the other rows: attnlrp_fast with offload="cpu" (the layers' checkpoints
                 in pinned host memory, brought back one layer ahead of the backward): its peak and time beside the
                 plain row's, and its relevance against it ("offload_agreement")
  attnlrp_fast_hops   with --hops K, at the first size, after every size's other rows: attnlrp_fast through a
                 reasoning span (the last min(N / 4, 4096) tokens before the target, K hops; attnlrp_fast/reasoning.py):
                 what K more backward passes cost in time and peak memory

Target: the argmax logit at the last position. All give the same relevance (checked at the first N: cosine
similarity and relative error of ours against the baseline's map). Seconds are medians of `--repeats` runs after one
warm-up (`--warmup first`: a warm-up at the first size only, where everything compiles, and none for the hop row;
`--warmup none`: none at all);
peak memory is torch.cuda.max_memory_allocated during the run minus what was allocated before it; beside it,
`estimated_peak_mib`: what af.estimate_memory predicts for the same model config, length, dtype and mode on meta
tensors (no GPU), so one run shows how far the estimate is from the GPU's allocator. A row that raises records its
error and the next one runs. `--longest` doubles N from the last timed N until a method runs out of memory (or its
run exceeds --longest-seconds, or N passes --longest-max).

    python bench/e2e.py --longest          # GPU: 8k and 32k, then the longest N; prints JSON rows
    python bench/e2e.py --smoke            # CPU, a tiny Llama (Triton's interpreter under TRITON_INTERPRET=1)
    python bench/e2e.py --sizes 8192 --repeats 1 --warmup first --hops 3 --offload --offload-tokens 131072 \
        --out e2e.json                     # gpu_check's
"""

import argparse
import contextlib
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from attnlrp_fast.baselines import lxt_style

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
TRITON = "attnlrp_fast_triton"
METHODS = ("lxt_style", "attnlrp_fast", TRITON)      # the baseline first: a run cut short loses ours, not it
OURS = ("attnlrp_fast", TRITON)
HOPS = "attnlrp_fast_hops"
OFFLOAD = "attnlrp_fast_offload"


def reasoning_span(n):
    """The reasoning span a hop row explains through: the last min(n // 4, 4096) tokens before the last one."""
    r = max(1, min(n // 4, 4096))
    return max(1, n - 1 - r), n - 1


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(shape, device, dtype, max_positions, layers=None):
    """The model of SHAPES[shape] with random weights (layers: fewer layers than the shape's, e.g. to warm
    the kernel cache)."""
    import transformers as tf

    torch.manual_seed(0)
    sizes = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    config = tf.LlamaConfig(**sizes, max_position_embeddings=max_positions, attn_implementation="sdpa")
    with torch.device(device), _default_dtype(dtype):
        model = tf.LlamaForCausalLM(config)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(method, model, baseline, ids, backend, hops=0):
    """(relevance or None, seconds, peak MiB or None) of one run."""
    import attnlrp_fast as af

    device = ids.device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    rel = None
    if method in OURS:
        rel = af.explain(model, input_ids=ids, backend="triton" if method == TRITON else backend,
                         checkpoint=True).relevance
    elif method == OFFLOAD:
        rel = af.explain(model, input_ids=ids, backend=backend, offload="cpu").relevance
    elif method == HOPS:
        rel = af.explain(model, input_ids=ids, backend=backend, checkpoint=True,
                         reasoning_span=reasoning_span(ids.shape[1]), hops=hops).prompt_relevance
    elif method == "lxt_style":
        rel = lxt_style.explain(baseline, ids, checkpoint=True)
    else:  # forward
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    _sync(device)
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return rel, seconds, peak


def timed(method, model, baseline, ids, backend, repeats, hops=0, warmup=True):
    if warmup:
        run_once(method, model, baseline, ids, backend, hops)                # warm-up (compiles, autotunes)
    runs = [run_once(method, model, baseline, ids, backend, hops) for _ in range(repeats)]
    rel = runs[-1][0]
    return rel, statistics.median(r[1] for r in runs), max((r[2] for r in runs if r[2] is not None), default=None)


def agreement(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "rel_err": float((a - b).norm() / b.norm())}


def _is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _writer(out, on_update):
    """save(result): rewrite `out` (atomically: a kill leaves the last complete JSON) and call on_update."""
    def save(result):
        if out:
            tmp = Path(str(out) + ".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(out)
        if on_update:
            on_update(result)
    return save


# (the hop method's estimate is the plain explanation's: af.estimate_memory does not model hops, so its measured /
# estimated ratio is what the hops add)
ESTIMATE_MODES = {"attnlrp_fast": "low_memory", TRITON: "low_memory", "lxt_style": "lxt_style", HOPS: "low_memory",
                  OFFLOAD: "low_memory"}


def estimated(model, method, n):
    """{"estimated_peak_mib": ...} for the method's explanation of n tokens (af.estimate_memory on meta tensors, the
    explanation's peak on top of the weights, as peak_mib is), or {"estimate_error": ...}; {} for the forward."""
    import attnlrp_fast as af

    if method not in ESTIMATE_MODES:
        return {}
    try:
        e = af.estimate_memory(model.config, n, dtype=model.dtype, mode=ESTIMATE_MODES[method],
                               offload="cpu" if method == OFFLOAD else None)
    except Exception as ex:  # noqa: BLE001 - a failing estimate must not cost the GPU measurements
        return {"estimate_error": f"{type(ex).__name__}: {str(ex).splitlines()[0][:200] if str(ex) else ''}"}
    host = {"estimated_host_mib": e.host / 2**20} if method == OFFLOAD else {}
    return {"estimated_peak_mib": e.peak / 2**20, "estimated_where": e.where, **host}


def _measured(fn, row):
    """row with seconds and peak MiB from fn() -> (rel, seconds, peak), or the error ("out of memory", or any other
    exception's type and first line: the next row still runs); returns rel."""
    try:
        rel, seconds, peak = fn()
    except Exception as e:  # noqa: BLE001 - recorded in the row
        first = (str(e).strip().splitlines() or [""])[0][:200]
        row["error"] = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {first}"
        return None
    row.update(seconds=seconds, peak_mib=peak)
    return rel


def _time_one(ctx, method, n, ids, repeats, result, save, hops=0, warmup=True):
    """One row: `method` at n tokens; returns its relevance (None when it failed)."""
    model, baseline, backend, _ = ctx
    row = {"method": method, "tokens": n, **estimated(model, method, n)}
    if method == HOPS:
        start, end = reasoning_span(n)
        row.update(hops=hops, reasoning_tokens=end - start)
    rel = _measured(lambda: timed(method, model, baseline, ids, backend, repeats, hops, warmup), row)
    result["rows"].append(row)
    save(result)
    print(json.dumps(row), flush=True)
    return rel


def _over_forward(result, n):
    fwd = next((r["seconds"] for r in result["rows"] if r["method"] == "forward" and r["tokens"] == n
                and "seconds" in r), None)
    for r in result["rows"]:
        if r["tokens"] == n and r["method"] != "forward" and "seconds" in r and fwd:
            r["explain_over_forward"] = r["seconds"] / fwd


def time_sizes(ctx, sizes, repeats, result, save, hops=0, methods=METHODS, warmup="each", offload=False,
               offload_tokens=None):
    """Each method at each size (median of `repeats` after a warm-up: at every size, or with warmup="first" at the
    first only), the ratio to the forward; agreement of ours with the baseline's relevance at the first size; then,
    with `hops`, the hop method at the first size; with `offload`, the offloaded explanation at the last size, or at
    `offload_tokens` after a forward and a plain explanation there (no warm-up: everything is compiled by then)."""
    model, _, _, g = ctx
    for i, n in enumerate(sizes):
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(model.device)
        rels = {}
        for method in ("forward",) + tuple(m for m in METHODS if m in methods):
            rel = _time_one(ctx, method, n, ids, repeats, result, save,
                            warmup=warmup == "each" or (warmup == "first" and i == 0))
            if rel is not None:
                rels[method] = rel
        _over_forward(result, n)
        last = (n, ids, rels.get("attnlrp_fast"))
        if i == 0 and "lxt_style" in rels:
            for name, key in (("attnlrp_fast", "agreement"), (TRITON, "agreement_triton")):
                if name in rels:
                    result[key] = {"tokens": n, **agreement(rels[name], rels["lxt_style"])}
                    print(json.dumps({key: result[key]}), flush=True)
            save(result)
    ours = [m for m in OURS if m in methods]
    if hops and ours:
        n = sizes[0]
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(model.device)
        hop_ctx = ctx if ours[0] == "attnlrp_fast" else (*ctx[:2], "triton", ctx[3])
        _time_one(hop_ctx, HOPS, n, ids, repeats, result, save, hops, warmup=warmup == "each")
        _over_forward(result, n)
        save(result)
    if offload and "attnlrp_fast" in methods:
        n, ids, plain = last
        warm = warmup == "each"
        if offload_tokens and offload_tokens != n:
            n, warm = offload_tokens, False
            ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(model.device)
            _time_one(ctx, "forward", n, ids, repeats, result, save, warmup=False)
            plain = _time_one(ctx, "attnlrp_fast", n, ids, repeats, result, save, warmup=False)
        rel = _time_one(ctx, OFFLOAD, n, ids, repeats, result, save, warmup=warm)
        _over_forward(result, n)
        if rel is not None and plain is not None:
            result["offload_agreement"] = {"tokens": n, **agreement(rel, plain)}
            print(json.dumps({"offload_agreement": result["offload_agreement"]}), flush=True)
        save(result)


def search_longest(ctx, first, longest_max, longest_seconds, result, save, methods=METHODS):
    """Per method, double N from its largest timed N until it fails, passes longest_max or a run takes too long."""
    model, baseline, backend, g = ctx
    for method in methods:
        ok = [r["tokens"] for r in result["rows"] if r["method"] == method and "seconds" in r]
        n, best = (max(ok), max(ok)) if ok else (first, None)
        while n * 2 <= longest_max:
            n *= 2
            ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(model.device)
            row = {"method": method, "tokens": n, "search": "longest", **estimated(model, method, n)}
            _measured(lambda: run_once(method, model, baseline, ids, backend), row)
            del ids
            result["rows"].append(row)
            save(result)
            print(json.dumps(row), flush=True)
            if "error" in row:
                break
            best = n
            if row["seconds"] > longest_seconds:
                row["stopped"] = f"run took over {longest_seconds:.0f} s"
                break
        result["longest"][method] = best
    print(json.dumps({"longest": result["longest"]}), flush=True)


def main(argv=None, on_update=None):
    """Returns the result dict; on_update(result) after each measurement (for saving partial results)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model (Triton's interpreter under TRITON_INTERPRET=1)")
    p.add_argument("--sizes", type=int, nargs="*", help="default: 8192 32768 (smoke: 64 128)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--longest", action="store_true", help="then double N per method until it fails")
    p.add_argument("--longest-max", type=int, default=None, help="default: 1M tokens (smoke: 256)")
    p.add_argument("--longest-seconds", type=float, default=150.0, help="stop a method's search after a run this long")
    p.add_argument("--out", default=None, help="also write the result JSON here (rewritten after every row)")
    p.add_argument("--hops", type=int, default=0, help="also the explanation through a reasoning span with this "
                                                       "many hops, at the first size (0: not)")
    p.add_argument("--offload", action="store_true", help="also attnlrp_fast with offload='cpu' at the last size")
    p.add_argument("--offload-tokens", type=int, default=None,
                   help="with --offload: that row (and a forward and a plain row beside it) at this length instead")
    p.add_argument("--methods", nargs="*", choices=("forward",) + METHODS, default=None,
                   help=f"which methods run (default: all; the forward always runs): {', '.join(METHODS)}")
    p.add_argument("--warmup", choices=("each", "first", "none"), default="each",
                   help="a warm-up run before every timed size, only before the first, or none (the first run then "
                        "includes the compiles; default each)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        p.error("no CUDA device: run with --smoke to check the harness on CPU")
    if args.repeats < 1 or any(n < 1 for n in args.sizes or ()) or args.hops < 0 or (args.offload_tokens or 1) < 1:
        p.error("--repeats, --sizes and --offload-tokens must be positive, --hops at least 0")
    if args.offload_tokens and not args.offload:
        p.error("--offload-tokens needs --offload")
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    shape = "llama3-8b" if cuda else "tiny"
    sizes = args.sizes or ([8192, 32768] if cuda else [64, 128])
    longest_max = args.longest_max or ((1 << 20) if cuda else 256)
    model = build(shape, device, dtype, max(max(sizes), args.offload_tokens or 0, longest_max if args.longest else 0))
    # backend None (auto): per call on CUDA (SDPA or Triton); on CPU Triton's interpreter under TRITON_INTERPRET=1
    ctx = (model, _shallow_patch_copy(model), None, torch.Generator().manual_seed(1))
    result = {"shape": {**SHAPES[shape], "name": shape}, "dtype": str(dtype).split(".")[-1], "rows": [],
              "agreement": None, "longest": {}}
    save = _writer(args.out, on_update)
    methods = tuple(m for m in METHODS if args.methods is None or m in args.methods)
    time_sizes(ctx, sizes, args.repeats, result, save, args.hops, methods, args.warmup, args.offload,
               args.offload_tokens)
    if args.longest:
        search_longest(ctx, sizes[0], longest_max, args.longest_seconds, result, save, methods)
    save(result)
    return result


def _shallow_patch_copy(model):
    """A second model object sharing every parameter with `model`, with the LXT-style patches on its own module
    objects (so that `model` stays unpatched for af.explain and the forward)."""
    import copy

    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return lxt_style.patch(copy.deepcopy(model, memo))


if __name__ == "__main__":
    main()
