"""`attnlrp-fast evaluate`: faithfulness of AttnLRP and the baselines (perturbation curves, ABPC, RISE / MAS /
RISE+AP, pointing accuracy) on the shipped tasks, or on --model and --document; evaluation.json (rewritten as each
task and method ends, "partial" until the last) and curves.png, and a table."""

import json
import time
from pathlib import Path

from attnlrp_fast.app import longdoc
from attnlrp_fast.app.common import (SMOLLM2, UsageError, bar_factory, check_hops, choose_device, choose_dtype,
                                     load_model, prompt_and_answer, reasoning_span)
from attnlrp_fast.bindings import dispatch
from attnlrp_fast.evaluation import evaluate as ev
from attnlrp_fast.evaluation import faithfulness

DOCUMENT_METHODS = ["attnlrp", "cp", "grad_x_input", "attention", "random"]   # the default on --document


def tokens(text, flag):
    """'8k' -> 8192, '1500' -> 1500; a UsageError naming `flag` otherwise."""
    t = text.strip().lower()
    try:
        value = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a number of tokens (e.g. 2048 or 2k)") from None
    if value < 256:
        raise UsageError(f"{flag}: {text!r} is shorter than 256 tokens")
    return value


def _check_evaluate_options(args):
    needle = args.task is not None and "needle" in args.task
    if args.samples is None:
        args.samples = 4 if needle else 64
    for flag, value in (("--steps", args.steps), ("--samples", args.samples), ("--ig-steps", args.ig_steps)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    check_hops(args)
    args.lengths = [tokens(t, "--lengths") for t in args.lengths.split(",") if t.strip()]
    args.curves_up_to = tokens(args.curves_up_to, "--curves-up-to") if args.curves_up_to else None
    if args.hops_asked is not None and args.model is None:
        raise UsageError("--hops goes with --model and --document (the shipped reasoning task runs one hop)")
    if needle:
        if args.document is not None:
            raise UsageError("--task needle makes its own documents from the sample report; leave --document out")
        return
    if (args.model is None) != (args.document is None):
        raise UsageError("--model and --document go together (evaluate on your own model and document); "
                         "--model alone goes with --task needle")
    if args.model is not None and args.task:
        raise UsageError("--task runs the shipped tasks; leave it out with --model / --document")


def _check_neuron_options(args):
    if args.document is not None or args.methods:
        raise UsageError("--task neurons / neurons-needle take no --document or --methods (they rank neurons, not "
                         "tokens)")
    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    args.lengths = [tokens(t, "--lengths") for t in args.lengths.split(",") if t.strip()]


def _parse_methods(text, device):
    """--methods as a list (None when not given), each name known and its backend one that runs here."""
    if not text:
        return None
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        try:
            _, backend = ev.parse_method(m)
        except ValueError as e:
            raise UsageError(f"--methods: {e}") from None
        if backend == "triton" and not dispatch.triton_runs_on(device):
            raise UsageError(f"--methods {m}: the Triton backend needs CUDA (or TRITON_INTERPRET=1 on CPU)")
    return methods


def _task_progress(bar, methods, needle_total=None):
    """A progress(task, _) callback for faithfulness.run: one bar per task (over the methods for recall, over the
    sentence pairs for minilm, over samples x lengths x methods for needle: at most, as samples the model answers
    wrongly are not explained); progress.close() closes them."""
    bars = {}

    def progress(task, _):
        if task not in bars:
            per_method = task != "minilm"
            total = {"recall": len(methods), "reasoning": len(faithfulness.reasoning_methods(methods)),
                     "minilm": len(faithfulness.sentence_pairs()), "needle": needle_total}[task]
            bars[task] = bar(total=total, desc=f"evaluating: {task}", unit="method" if per_method else "pair")
        bars[task].update()
    progress.close = lambda: [b.close() for b in bars.values()]
    return progress


def _evaluate_shipped_tasks(args, device, methods, bar):
    tasks = list(dict.fromkeys(args.task or faithfulness.TASKS))
    methods = methods or faithfulness.available_methods(device)
    progress = _task_progress(bar, methods, args.samples * len(args.lengths) * len(methods))
    needle_options = {"lengths": args.lengths, "curves_up_to": args.curves_up_to}
    if "needle" in tasks:
        model, tokenizer = load_model(_needle_model(args), device, choose_dtype(args.dtype, device))
        needle_options.update(model=model, tokenizer=tokenizer, model_name=args.model or SMOLLM2)
    try:
        return faithfulness.run(tasks, methods, steps=args.steps, seed=args.seed, device=device, perturb=args.perturb,
                                samples=args.samples, ig_steps=args.ig_steps, progress=progress,
                                partial=lambda result: _write_json(args, result, partial=True),
                                needle_options=needle_options)
    finally:
        progress.close()


def _needle_model(args):
    """The arguments common.load_model takes, for the needle task's model (--model, default SmolLM2)."""
    from types import SimpleNamespace

    return SimpleNamespace(model=args.model or SMOLLM2, quiet=args.quiet)


def _evaluate_document(args, device, document, methods, bar):
    """The evaluation on --model and --document: the answer (given or generated) explained by each method."""
    dtype = choose_dtype(args.dtype, device)
    model, tokenizer = load_model(args, device, dtype)
    answer = prompt_and_answer(args, model, tokenizer, document, bar, dispatch.backend_for_many_passes(device))
    reasoning = reasoning_span(args, tokenizer, answer)
    methods = methods or list(DOCUMENT_METHODS)
    if reasoning is not None:
        methods = faithfulness.reasoning_methods(methods)
    replace = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    if args.perturb == "token" and replace is None:
        raise UsageError("--perturb token: the tokenizer has no pad or unknown token to put in")
    result = {"device": str(device), "settings": {"steps": args.steps, "seed": args.seed, "perturb": args.perturb,
                                                  "methods": methods},
              "tasks": {"document": {"task": "document", "partial": True, "model": args.model,
                                     "answer": tokenizer.decode(answer.ids), "methods": {}}}}

    def method_done(method, out):
        result["tasks"]["document"]["methods"][method] = out
        _write_json(args, result, partial=True)

    with bar(total=len(methods), desc="evaluating the document", unit="method") as b:
        out = faithfulness.run_document(model, answer.prompt, answer.ids, methods, steps=args.steps, seed=args.seed,
                                        perturb=args.perturb, ig_steps=args.ig_steps, replace_id=replace,
                                        progress=lambda m: b.update(), on_result=method_done,
                                        reasoning=reasoning, hops=args.hops)
    out.update(model=args.model, answer=tokenizer.decode(answer.ids))
    result["tasks"]["document"] = out
    return result


def _write_json(args, result, partial=False):
    """evaluation.json in --out and the --json file; returns their paths. partial=True: a run still under way
    (written after each task and method, "partial": true at the top and in unfinished tasks), replaced at the end."""
    paths = [Path(args.out) / "evaluation.json"] + ([Path(args.json)] if args.json else [])
    data = {**result, "partial": True} if partial else result
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        tmp.replace(path)   # a reader never sees half a file
    return paths


def _write_evaluation(args, result):
    """evaluation.json and curves.png in --out, the JSON also at --json; returns the paths."""
    paths = _write_json(args, result)
    return paths + [faithfulness.plot_curves(result, Path(args.out) / "curves.png")]


def _neuron_tasks(args, device, bar):
    """The neuron-level check (evaluation/neuron_ablation.py) for the --task names among its TASKS."""
    from attnlrp_fast.evaluation import neuron_ablation

    asked = [t for t in args.task or () if t in neuron_ablation.TASKS]
    if not asked:
        return None
    options = {}
    if "neurons-needle" in asked:
        model, tokenizer = load_model(_needle_model(args), device, choose_dtype(args.dtype, device))
        options = {"model": model, "tokenizer": tokenizer}
    samples = args.samples if args.samples is not None else 32
    total = 2 * samples * ("neurons" in asked) + args.needle_samples * ("neurons-needle" in asked)
    with bar(total=total, desc="evaluating: neurons", unit="prompt") as b:
        return neuron_ablation.run(asked, samples=samples, needle_samples=args.needle_samples,
                                   length=args.lengths[0], seed=args.seed, device=device,
                                   backend=dispatch.backend_for_many_passes(device), progress=b.update, **options)


def run(args):
    from attnlrp_fast.evaluation import neuron_ablation

    t0 = time.perf_counter()
    neuron_tasks = [t for t in args.task or () if t in neuron_ablation.TASKS]
    args.task = [t for t in args.task or () if t not in neuron_ablation.TASKS] or None
    args.needle_samples = args.samples if args.samples is not None else 2
    if neuron_tasks and args.task is None:   # only the neuron check
        _check_neuron_options(args)
        device = choose_device(args.device)
        bar = bar_factory(args.quiet, lines=True)
        args.task = neuron_tasks
        result = {"device": str(device), "neurons": _neuron_tasks(args, device, bar),
                  "seconds": time.perf_counter() - t0}
        paths = _write_json(args, result)
        print(neuron_ablation.table(result["neurons"]))
        print("reports: " + ", ".join(str(p) for p in paths))
        return 0
    if neuron_tasks:
        raise UsageError("--task neurons / neurons-needle run on their own: leave the other tasks out")
    _check_evaluate_options(args)
    document = longdoc.read_document(args.document) if args.document else None
    device = choose_device(args.device)
    methods = _parse_methods(args.methods, device)
    bar = bar_factory(args.quiet, lines=True)
    if document is None:
        result = _evaluate_shipped_tasks(args, device, methods, bar)
    else:
        result = _evaluate_document(args, device, document, methods, bar)
    result["seconds"] = time.perf_counter() - t0
    paths = _write_evaluation(args, result)
    print(faithfulness.table(result))
    for task, out in result["tasks"].items():
        if "model_accuracy" in out:
            sampled = out.get("sampled", out["samples"])
            print(f"{task}: the model answers {out['model_accuracy']:.1%} of the {sampled} samples correctly")
    print("reports: " + ", ".join(str(p) for p in paths))
    return 0

