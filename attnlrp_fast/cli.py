"""The `attnlrp-fast` command.

  attnlrp-fast explain --model PATH_OR_ID --document FILE [--question TEXT] [--answer TEXT] [--rule attnlrp|cp|grad]
                       [--out DIR] [--device auto|cpu|cuda] [--dtype auto|bfloat16|float16|float32] [--no-chat]
                       [--max-new-tokens 32] [--per-token]
      which parts of a document made a causal LM answer what it answered: DIR/explanation.json, .html, .png
  attnlrp-fast demo [--out DIR] [--query TEXT] [--document FILE]
      the same job offline on the embedded MiniLM: which words make the best passages match a query
  attnlrp-fast evaluate [--task recall|minilm] [--model PATH --document FILE] [--methods ...] [--steps 10]
      faithfulness: perturbation curves, ABPC and pointing accuracy of AttnLRP and the baselines

  attnlrp-fast check [--device auto|cpu|cuda] [--dtype auto|bfloat16|float16|float32] [--backend auto|triton|torch]
      runs the attention engine for every rule and mask feature on fresh random inputs, compares output
      and gradients with the float64 reference, prints a table and exits non-zero on any mismatch.
  attnlrp-fast info
      versions, devices and which backend `auto` picks here.
"""

import argparse
import sys

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}
CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window+softcap": {"causal": True, "window": 37, "softcap": 5.0},
    "padding": {"padding": True},
}


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


def _device(name):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (try --device cpu)")
    return torch.device(name)


def _dtype(name, device):
    import torch

    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    if device.type == "cpu" and name == "bfloat16":
        # Triton's interpreter computes bf16 dot products wrongly; the CPU path itself would be fine,
        # but a check that cannot check the kernels is not offered.
        from attnlrp_fast.kernels import interpreting

        if interpreting():
            raise UsageError("--dtype bfloat16 cannot be checked in Triton's interpreter; use float16 or float32")
    return name, getattr(torch, name)


def _relative_errors(device, dtype, rule, kw, generator, backend):
    import torch

    import attnlrp_fast as af
    from attnlrp_fast.reference import attention_dense

    B, H, Hkv, N, M, D = (2, 8, 2, 300, 333, 64) if device.type == "cuda" else (2, 8, 2, 70, 77, 32)
    kw = dict(kw)
    if kw.pop("padding", False):
        kw["key_padding_mask"] = (torch.rand(B, M, generator=generator) > 0.25).to(device)
    q, k, v, do = (torch.randn(B, h, n, D, generator=generator).to(device, dtype)
                   for h, n in ((H, N), (Hkv, M), (Hkv, M), (H, N)))
    got, want = [], []
    engine = lambda *a, **kw: af.attention(*a, backend=backend, **kw)  # noqa: E731
    for fn, cast in ((engine, lambda x: x), (attention_dense, lambda x: x.double())):
        leaves = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        o = fn(*leaves, rule=rule, **kw)
        o.backward(cast(do))
        grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
        (got if fn is engine else want).extend([o.detach(), *grads])
    errors = []
    for a, b in zip(got, want):
        a = a.double()
        if not torch.isfinite(a).all():
            errors.append(float("inf"))
        else:
            denom = b.norm()
            errors.append(((a - b).norm() / denom).item() if denom > 0 else a.norm().item())
    return errors


def cmd_check(args):
    import torch

    from attnlrp_fast.bindings import uses_triton

    device = _device(args.device)
    dtype_name, dtype = _dtype(args.dtype, device)
    backend = None if args.backend == "auto" else args.backend
    try:
        path = "triton" if uses_triton(device, dtype, args.backend) else "torch"
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--backend {args.backend}: {e}") from None
    print(f"attention engine check on {device} ({dtype_name}, {path} path, GQA 4 query heads per K/V head); "
          f"relative error vs float64, tolerance {TOLERANCE[dtype_name]:g}")
    print(f"{'case':<16}{'rule':<9}{'o':>10}{'dq':>10}{'dk':>10}{'dv':>10}")
    g = torch.Generator().manual_seed(args.seed)
    failures = 0
    for case, kw in CASES.items():
        for rule in ("grad", "attnlrp", "cp"):
            errs = _relative_errors(device, dtype, rule, kw, g, backend)
            ok = all(e < TOLERANCE[dtype_name] for e in errs)
            failures += not ok
            print(f"{case:<16}{rule:<9}" + "".join(f"{e:>10.1e}" for e in errs) + ("" if ok else "   FAIL"))
    print("all checks passed" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0


def cmd_info(args):
    import torch
    import triton

    import attnlrp_fast as af
    from attnlrp_fast.bindings import uses_triton
    from attnlrp_fast.kernels import interpreting

    print(f"attnlrp-fast {af.__version__}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print(f"Triton interpreter (TRITON_INTERPRET): {'on' if interpreting() else 'off'}")
    for dev in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        path = "triton" if uses_triton(torch.device(dev), torch.float32, "auto") else "torch"
        print(f"backend=None on {dev} tensors -> {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bar_factory(quiet):
    from tqdm.auto import tqdm

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    def bar(disable=None, **kw):
        return tqdm(disable=True if quiet else disable, leave=False, dynamic_ncols=True, **kw)
    return bar


def _layer_progress(bar, n_layers, label):
    """A progress(event) callback for af.explain with one bar for the forward and one for the backward."""
    bars = {}

    def progress(event):
        if event not in bars:
            bars[event] = bar(total=n_layers, desc=f"{label}: {event}", unit="layer")
        bars[event].update()
        if bars[event].n >= n_layers:
            bars.pop(event).close()
    progress.close = lambda: [b.close() for b in bars.values()]
    return progress


def _print_summary(pieces, relevance, paths, lines):
    from attnlrp_fast import report

    for line in lines:
        print(line)
    for line in report.summary(pieces, relevance, k=5):
        print(line)
    print("reports: " + ", ".join(str(p) for p in paths))


def _prompt_and_answer(args, model, tokenizer, document, bar, backend):
    """The prompt (document + --question) and the answer's token ids: --answer's, else the model's greedy answer.
    Returns (prompt, answer ids, seconds spent generating or None)."""
    import time

    from attnlrp_fast import longdoc

    prompt = longdoc.build_prompt(tokenizer, document, args.question, chat=not args.no_chat)
    answer_ids = longdoc.tokenize_answer(tokenizer, args.answer) if args.answer is not None else None
    longdoc.check_length(model, prompt, len(answer_ids) if answer_ids else args.max_new_tokens, args.model)
    if answer_ids is not None:
        return prompt, answer_ids, None
    t = time.perf_counter()
    with bar(total=args.max_new_tokens, desc="generating the answer", unit="token") as b:
        answer_ids = longdoc.generate_answer(model, tokenizer, prompt.ids, args.max_new_tokens, tick=b.update,
                                             backend=backend)
    return prompt, answer_ids, time.perf_counter() - t


def cmd_explain(args):
    import time

    from attnlrp_fast import longdoc, report
    from attnlrp_fast.memory import transformer_layers

    t0 = time.perf_counter()
    document = longdoc.read_document(args.document)
    device = longdoc.pick_device(args.device)
    dtype = longdoc.pick_dtype(args.dtype, device)
    if args.mlp_chunk < 0:
        raise UsageError(f"--mlp-chunk must be 0 (no chunking) or a positive number of tokens, got {args.mlp_chunk}")
    if args.answer is None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    backend = {"auto": None if device.type == "cuda" else "torch", "triton": "triton", "torch": "torch"}[args.backend]
    bar = _bar_factory(args.quiet)
    timings = {}
    model, tokenizer = longdoc.load_model(args.model, device, dtype)
    timings["load"] = time.perf_counter() - t0

    prompt, answer_ids, seconds = _prompt_and_answer(args, model, tokenizer, document, bar, backend)
    if seconds is not None:
        timings["generate"] = seconds
    answer = tokenizer.decode(answer_ids)
    n_layers = len(transformer_layers(model))
    progress = _layer_progress(bar, n_layers, f"explaining {len(prompt.ids) + len(answer_ids)} tokens")
    with bar(total=len(answer_ids), desc="answer tokens", unit="token", disable=True if (args.quiet or not args.per_token)
             else None) as tokens_bar:
        result = longdoc.explain_answer(model, prompt, answer_ids, args.rule, backend, per_token=args.per_token,
                                        checkpoint=not args.no_checkpoint, mlp_chunk=args.mlp_chunk,
                                        progress=progress, token_tick=tokens_bar.update)
    progress.close()
    timings["explain"] = result.seconds

    t = time.perf_counter()
    a, b = prompt.doc_start, prompt.doc_end
    rel = result.relevance
    answer_pieces = [tokenizer.decode([i]) for i in answer_ids]
    others = [{"index": i, "token": prompt.token_text[i], "relevance": rel[i]}
              for i in range(len(prompt.ids)) if not a <= i < b]
    total = sum(rel)
    meta = {
        "model": args.model, "rule": args.rule, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "backend": backend or "triton", "question": args.question, "answer": answer,
        "answer_source": "given" if args.answer is not None else "greedy",
        "target_logit": sum(result.target_logits),
        "prompt_tokens": len(prompt.ids), "document_tokens": b - a,
        "relevance_total": total, "relevance_document": sum(rel[a:b]),
        "relevance_question_and_template": sum(o["relevance"] for o in others),
        "relevance_earlier_answer_tokens": sum(rel[len(prompt.ids):]),
    }
    maps = None
    if args.per_token:
        maps = {f"{j}: {answer_pieces[j]!r}": r[a:b] for j, r in result.per_token}
    paths = report.write_reports(
        args.out, prompt.pieces, rel[a:b], title=f"Why the model answered {answer.strip()[:80]!r}",
        maps=maps, plot=(b - a) >= 200, **meta)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    _extend_json(paths[0], {
        "answer_tokens": answer_pieces, "answer_token_ids": answer_ids, "target_logits": result.target_logits,
        "other_prompt_tokens": others, "timings": timings,
    })
    share = meta["relevance_document"] / total if total else float("nan")
    _print_summary(prompt.pieces, rel[a:b], paths, [
        f"answer ({meta['answer_source']}): {answer.strip()!r}",
        f"explained {len(prompt.ids) + len(answer_ids)} tokens with {args.rule} in {result.seconds:.1f} s on {device}; "
        f"target logit {meta['target_logit']:.4g}, relevance total {total:.4g} (document {share:.0%})",
    ])
    return 0


def _extend_json(path, extra):
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(extra)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def cmd_demo(args):
    import html
    import time

    from attnlrp_fast import demo, longdoc, report

    t0 = time.perf_counter()
    device = longdoc.pick_device(args.device)
    path = args.document or demo.sample_document_path()
    document = longdoc.read_document(path)
    query = args.query if args.query is not None else demo.DEFAULT_QUERY
    if not query.strip():
        raise UsageError("--query is empty")
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    r = demo.run(document, query, top=args.top, device=device, rule=args.rule,
                 backend=None if device.type == "cuda" else "torch", bar=_bar_factory(args.quiet))
    passages, ranked = r["passages"], r["ranked"]
    explained = {id(p): (tokens, rel, sim) for p, _, rel, tokens, sim in r["explained"]}
    items = []
    for rank, i in enumerate(ranked[:10], 1):
        p = passages[i]
        mark = " (explained)" if id(p) in explained else ""
        items.append(f"<li>{p.score:.3f}{mark}: {html.escape(p.text[:160])}{'...' if len(p.text) > 160 else ''}</li>")
    q_words = "".join(f'<span title="{v:.4g}" style="background:{report._colour(v, max(map(abs, r["query_relevance"])) or 1)}">'
                      f"{html.escape(t)}</span> " for t, v in zip(r["query_tokens"], r["query_relevance"]))
    extra = (f"<h2>Passages ranked by similarity to the query</h2><ol>{''.join(items)}</ol>"
             f"<h2>Query tokens that match the best passage</h2><p>{q_words}</p>")
    paths = report.write_reports(
        args.out, r["pieces"], r["relevance"], title=f"Which words make these passages match: {query}",
        extra_html=extra, plot=True, model=r["model"], query=query, rule=args.rule, device=str(device),
        document=str(path), passages_explained=len(explained))
    r["timings"]["total"] = time.perf_counter() - t0
    _extend_json(paths[0], {
        "passages": [{"rank": rank, "score": passages[i].score, "start_char": passages[i].start,
                      "end_char": passages[i].end, "text": passages[i].text, "explained": id(passages[i]) in explained,
                      **({"similarity_explained": explained[id(passages[i])][2],
                          "wordpieces": explained[id(passages[i])][0],
                          "wordpiece_relevance": explained[id(passages[i])][1]} if id(passages[i]) in explained else {})}
                     for rank, i in enumerate(ranked, 1)],
        "query_tokens": r["query_tokens"], "query_relevance": r["query_relevance"], "timings": r["timings"],
    })
    lines = [f"query: {query!r}; {len(passages)} passages ranked with {r['model']} on {device}",
             "best passages (cosine similarity):"]
    for i in ranked[:args.top]:
        p = passages[i]
        lines.append(f"  {p.score:.3f}  {' '.join(p.text.split())[:90]}...")
    q_top = sorted(zip(r["query_tokens"], r["query_relevance"]), key=lambda x: -x[1])[:4]
    lines.append("query tokens that match the best passage most: " + ", ".join(f"{t} ({v:.3f})" for t, v in q_top))
    _print_summary(r["pieces"], r["relevance"], paths, lines)
    return 0


def cmd_evaluate(args):
    import json
    import time
    from pathlib import Path

    from attnlrp_fast import evaluate as ev
    from attnlrp_fast import faithfulness, longdoc

    t0 = time.perf_counter()
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    if args.ig_steps < 1:
        raise UsageError(f"--ig-steps must be at least 1, got {args.ig_steps}")
    if (args.model is None) != (args.document is None):
        raise UsageError("--model and --document go together (evaluate on your own model and document)")
    if args.model is not None and args.task:
        raise UsageError("--task runs the shipped tasks; leave it out with --model / --document")
    document = longdoc.read_document(args.document) if args.document else None
    device = longdoc.pick_device(args.device)
    methods = None
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for m in methods:
            try:
                name, backend = ev.parse_method(m)
            except ValueError as e:
                raise UsageError(f"--methods: {e}") from None
            if backend == "triton":
                from attnlrp_fast.bindings.attention import triton_runs_on

                if not triton_runs_on(device):
                    raise UsageError(f"--methods {m}: the Triton backend needs CUDA (or TRITON_INTERPRET=1 on CPU)")
    bar = _bar_factory(args.quiet)
    if document is None:
        tasks = args.task or list(faithfulness.TASKS)
        methods = methods or faithfulness.available_methods(device)
        bars = {}

        def progress(task, _):
            if task not in bars:
                total = len(methods) if task == "recall" else len(faithfulness.sentence_pairs())
                bars[task] = bar(total=total, desc=f"evaluating: {task}", unit="method" if task == "recall" else "pair")
            bars[task].update()
        try:
            result = faithfulness.run(tasks, methods, steps=args.steps, seed=args.seed, device=device,
                                      perturb=args.perturb, samples=args.samples, ig_steps=args.ig_steps,
                                      progress=progress)
        finally:
            for b in bars.values():
                b.close()
    else:
        dtype = longdoc.pick_dtype(args.dtype, device)
        model, tokenizer = longdoc.load_model(args.model, device, dtype)
        prompt, answer_ids, _ = _prompt_and_answer(args, model, tokenizer, document, bar,
                                                   faithfulness.default_backend(device))
        methods = methods or ["attnlrp", "cp", "grad_x_input", "attention", "random"]
        replace = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        if args.perturb == "token" and replace is None:
            raise UsageError("--perturb token: the tokenizer has no pad or unknown token to put in")
        with bar(total=len(methods), desc="evaluating", unit="method") as b:
            out = faithfulness.run_document(model, prompt, answer_ids, methods, steps=args.steps, seed=args.seed,
                                            perturb=args.perturb, ig_steps=args.ig_steps, replace_id=replace,
                                            progress=lambda m: b.update())
        out.update(model=args.model, answer=tokenizer.decode(answer_ids))
        result = {"device": str(device), "settings": {"steps": args.steps, "seed": args.seed, "perturb": args.perturb,
                                                      "methods": methods}, "tasks": {"document": out}}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["seconds"] = time.perf_counter() - t0
    paths = [out_dir / "evaluation.json"]
    paths[0].write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
        paths.append(Path(args.json))
    paths.append(faithfulness.plot_curves(result, out_dir / "curves.png"))
    print(faithfulness.table(result))
    for task, out in result["tasks"].items():
        if "model_accuracy" in out:
            print(f"{task}: the model answers {out['model_accuracy']:.1%} of the {out['samples']} samples correctly")
    print("reports: " + ", ".join(str(p) for p in paths))
    return 0


def build_parser():
    p = _Parser(prog="attnlrp-fast", description="AttnLRP explanations with fused Triton kernels")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    e = sub.add_parser("explain", help="which parts of a document made a causal LM give its answer")
    e.add_argument("--model", required=True, help="a local model folder or a hub id")
    e.add_argument("--document", required=True, help="UTF-8 text file")
    e.add_argument("--question", default=None, help="asked after the document (default: none, the document alone)")
    e.add_argument("--answer", default=None, help="explain this answer (default: generate one greedily)")
    e.add_argument("--rule", choices=("attnlrp", "cp", "grad"), default="attnlrp")
    e.add_argument("--out", default="attnlrp-report", help="folder for explanation.json/.html/.png")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="auto: bfloat16 on CUDA (float16 without bf16), float32 on CPU")
    e.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="auto: Triton kernels on CUDA, the chunked torch path on CPU")
    e.add_argument("--no-chat", action="store_true", help="plain text prompt even if the tokenizer has a chat template")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--per-token", action="store_true", help="also one relevance map per answer token")
    e.add_argument("--no-checkpoint", action="store_true",
                   help="keep every layer's activations (faster, memory grows with layers x length)")
    e.add_argument("--mlp-chunk", type=int, default=1024, help="tokens per MLP chunk (0: no chunking)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_explain)
    d = sub.add_parser("demo", help="offline demo on the embedded MiniLM and a shipped long document")
    d.add_argument("--out", default="attnlrp-demo", help="folder for explanation.json/.html/.png")
    d.add_argument("--query", default=None, help="what to look for in the document")
    d.add_argument("--document", default=None, help="UTF-8 text file (default: the shipped sample report)")
    d.add_argument("--top", type=int, default=3, help="how many top passages to explain")
    d.add_argument("--rule", choices=("attnlrp", "cp", "grad"), default="attnlrp")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)
    v = sub.add_parser("evaluate", help="faithfulness of AttnLRP and baselines: perturbation curves, ABPC, pointing")
    v.add_argument("--task", action="append", choices=("recall", "minilm"),
                   help="a shipped task (repeatable; default: all): recall (tiny Llama, ground-truth evidence), "
                        "minilm (real MiniLM weights, sentence-pair similarity)")
    v.add_argument("--model", default=None, help="your causal LM (local folder or hub id), with --document")
    v.add_argument("--document", default=None, help="UTF-8 text file, with --model")
    v.add_argument("--question", default=None)
    v.add_argument("--answer", default=None, help="explain this answer (default: generate one greedily)")
    v.add_argument("--no-chat", action="store_true")
    v.add_argument("--max-new-tokens", type=int, default=16)
    v.add_argument("--methods", default=None,
                   help="comma-separated, of attnlrp, cp, grad_x_input, integrated_gradients, attention, random "
                        "(name[torch] / name[triton] for a backend); default: all, AttnLRP on each backend here")
    v.add_argument("--steps", type=int, default=10, help="perturbation steps from 0 to all eligible tokens")
    v.add_argument("--perturb", choices=("zero", "token"), default="zero",
                   help="zero the removed tokens' input embeddings, or put in a pad / mask token")
    v.add_argument("--samples", type=int, default=64, help="recall sequences")
    v.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients path points")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    v.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    v.add_argument("--out", default="attnlrp-eval", help="folder for evaluation.json and curves.png")
    v.add_argument("--json", default=None, help="also write the result JSON here")
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    v.set_defaults(func=cmd_evaluate)
    c = sub.add_parser("check", help="check the attention engine against the float64 reference on this machine")
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    c.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    c.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="auto: Triton on CUDA (and in the interpreter), the torch path on CPU")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_check)
    i = sub.add_parser("info", help="versions, devices and backend choice")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from attnlrp_fast.longdoc import InputError
    from attnlrp_fast.models import UnsupportedModelError

    try:
        return args.func(args)
    except (UsageError, InputError, UnsupportedModelError) as e:
        print(f"attnlrp-fast: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("attnlrp-fast: error: out of memory (CPU); try a shorter document or a GPU", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attnlrp-fast: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        print(f"attnlrp-fast: error: out of memory ({str(e).splitlines()[0][:160]}); try --dtype bfloat16, "
              "a smaller --mlp-chunk or a shorter document", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
