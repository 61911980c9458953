"""The `attnlrp-fast` command.

  attnlrp-fast explain --model PATH_OR_ID --document FILE [--question TEXT] [--answer TEXT] [--rule attnlrp|cp|grad]
                       [--out DIR] [--device auto|cpu|cuda] [--dtype auto|bfloat16|float16|float32] [--no-chat]
                       [--max-new-tokens 32] [--per-token] [--reasoning auto|none|START:END] [--hops 3]
      which parts of a document made a causal LM answer what it answered: DIR/explanation.json, .html, .png
      (a reasoning model's <think> ... </think> block is found and followed back to the document, hop by hop)
      (--model tiny: a tiny random Llama built here, no download; --document defaults to the shipped sample report)
  attnlrp-fast explain --model FOLDER --image photo.png [--image ...] --question TEXT [--answer TEXT] [--out DIR]
      which image regions and words made a vision-language model (LLaVA) answer what it answered:
      DIR/overlay_<k>.png, explanation.html (overlays beside the prompt heatmap), explanation.json (image maps, shares)
  attnlrp-fast make-model DIR [--layers 2] [--hidden 64]
      saves that tiny random Llama with a BPE tokenizer and a chat template to DIR
  attnlrp-fast demo [--out DIR] [--query TEXT] [--document FILE]
      the same job offline on the embedded MiniLM: which words make the best passages match a query
  attnlrp-fast evaluate [--task recall|minilm|reasoning] [--model PATH --document FILE] [--methods ...] [--steps 10]
      faithfulness: perturbation curves, ABPC, RISE / MAS / RISE+AP and pointing accuracy of AttnLRP and the
      baselines (and of AttnLRP through a reasoning span)

  attnlrp-fast check [--device auto|cpu|cuda] [--dtype auto|bfloat16|float16|float32] [--backend auto|triton|torch]
      runs the attention engine for every rule and mask feature on fresh random inputs, compares output
      and gradients with the float64 reference, prints a table and exits non-zero on any mismatch.
  attnlrp-fast estimate --model NAME|CONFIG_JSON|FOLDER|HUB_ID [--tokens 8k,32k,128k,1m] [--dtype bfloat16]
                        [--gpu-memory 80GiB] [--mlp-chunk 1024] [--modes ...]
      memory of one explanation per mode and length, from the config alone (no weights), and the longest document
      that fits a GPU
  attnlrp-fast info
      versions, devices and which backend `auto` picks here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass


class _Module:
    """A module imported on first attribute access: `--help` and option errors answer without torch, transformers or
    the engine (the package's heavy modules load when a command runs)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        return getattr(importlib.import_module(self._name), attribute)


demo = _Module("attnlrp_fast.app.demo")
longdoc = _Module("attnlrp_fast.app.longdoc")
report = _Module("attnlrp_fast.app.report")
reasoning_report = _Module("attnlrp_fast.app.reasoning_report")
tiny = _Module("attnlrp_fast.app.tiny")
dispatch = _Module("attnlrp_fast.bindings.dispatch")

# The options' choices, as the engine defines them (attnlrp_fast.bindings.dispatch, attnlrp_fast.kernels.rules,
# attnlrp_fast.estimate); copied so that building the parser imports none of them (a test keeps them equal).
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")
BACKENDS = ("auto", "triton", "torch")
RULES = ("grad", "attnlrp", "cp")
ESTIMATE_MODES = ("low_memory", "plain", "lxt_style", "eager")

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}
CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window+softcap": {"causal": True, "window": 37, "softcap": 5.0},
    "padding": {"padding": True},
}
RULE_CHOICES = sorted(RULES)   # as the options have always listed them: attnlrp, cp, grad


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


# --- device, dtype and backend: dispatch decides, the options' errors become one line -------------------------
def _choose_device(name):
    try:
        return dispatch.choose_device(name)
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def _choose_dtype(name, device):
    try:
        return dispatch.choose_dtype(name, device)
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def _choose_backend(name, device, dtype, *, many_passes=False):
    """--backend auto|triton|torch -> the backend argument of the engine: auto is None (dispatch decides per call)
    or, for work of many passes (generation, explanation of a long document), the torch path on CPU. A backend
    that cannot run on `device` with `dtype` is a UsageError."""
    backend = None if name == "auto" else name
    dispatch.check_backend(backend)
    if backend is None and many_passes:
        backend = dispatch.backend_for_many_passes(device)
    try:
        dispatch.uses_triton(device, dtype, backend)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--backend {name}: {e}") from None
    return backend


# --- check, info -----------------------------------------------------------------------------------------------
def _checkable_dtype(name, device):
    """--dtype for `check`: as for the other commands, but no bfloat16 in Triton's interpreter, which computes bf16
    dot products wrongly (the CPU path itself would be fine, but a check that cannot check the kernels is not
    offered)."""
    import torch

    from attnlrp_fast.kernels import interpreting

    dtype = _choose_dtype(name, device)
    if device.type == "cpu" and dtype == torch.bfloat16 and interpreting():
        raise UsageError("--dtype bfloat16 cannot be checked in Triton's interpreter; use float16 or float32")
    return dtype


def _relative_errors(device, dtype, rule, case, generator, backend):
    """[o, dq, dk, dv]: relative errors of the engine against the float64 oracle for `rule` and one of CASES, on
    fresh random GQA inputs."""
    import torch

    from attnlrp_fast.selfcheck import OUTPUTS, attention_errors

    B, H, Hkv, N, M, D = (2, 8, 2, 300, 333, 64) if device.type == "cuda" else (2, 8, 2, 70, 77, 32)
    kw = dict(case)
    if kw.pop("padding", False):
        kw["key_padding_mask"] = (torch.rand(B, M, generator=generator) > 0.25).to(device)
    q, k, v, do = (torch.randn(B, h, n, D, generator=generator).to(device, dtype)
                   for h, n in ((H, N), (Hkv, M), (Hkv, M), (H, N)))
    errors = attention_errors(q, k, v, do, backend=backend, rule=rule, **kw)
    return [errors[name] for name in OUTPUTS]


def _engine_checked(device, dtype, backend):
    """What `check` runs, in words, and (when it is not the kernels) how to check the kernels here."""
    from attnlrp_fast.kernels import interpreting

    if dispatch.uses_triton(device, dtype, backend):
        if device.type == "cuda":
            import torch

            return f"the Triton kernels on {torch.cuda.get_device_name(device)}", None
        return "the Triton kernels in Triton's interpreter on the CPU (TRITON_INTERPRET=1; slow, exact)", None
    engine = f"the torch path on {device} (PyTorch operations, not the Triton kernels)"
    if device.type == "cpu" and not interpreting():
        return engine, ("to check the Triton kernels on this CPU: TRITON_INTERPRET=1 attnlrp-fast check "
                        "(about a minute)")
    return engine, None


def cmd_check(args):
    import torch

    from attnlrp_fast.selfcheck import OUTPUTS

    device = _choose_device(args.device)
    dtype = _checkable_dtype(args.dtype, device)
    backend = _choose_backend(args.backend, device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    engine, hint = _engine_checked(device, dtype, backend)
    print(f"checked: {engine}, {dtype_name}")
    if hint:
        print(hint)
    print(f"attention forward and backward, GQA 4 query heads per K/V head; relative error vs float64, "
          f"tolerance {TOLERANCE[dtype_name]:g}")
    print(f"{'case':<16}{'rule':<9}" + "".join(f"{name:>10}" for name in OUTPUTS))
    g = torch.Generator().manual_seed(args.seed)
    failures = 0
    for case, kw in CASES.items():
        for rule in RULES:
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
    from attnlrp_fast.kernels import interpreting

    print(f"attnlrp-fast {af.__version__}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print(f"Triton interpreter (TRITON_INTERPRET): {'on' if interpreting() else 'off'}")
    for dev in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        path = "triton" if dispatch.uses_triton(torch.device(dev), torch.float32, None) else "torch"
        print(f"backend=None on {dev} tensors -> {path} (norms, GLU products; attention per call, below)")
    print(f"dispatch table: {_dispatch_table_line()}")
    for dev in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        device = torch.device(dev)
        dtype = dispatch.choose_dtype("auto", device)
        print(f"attention on {dev} tensors ({str(dtype).removeprefix('torch.')}), backend=None:")
        for label, choice in dispatch.describe_attention(device, dtype):
            print(f"  {label:<44} -> {choice.engine}: {choice.reason}")
    return 0


def _dispatch_table_line():
    from attnlrp_fast.bindings import dispatch_table

    path = dispatch_table.table_path()
    try:
        table = dispatch_table.load_table()
    except (OSError, ValueError) as e:
        return f"{path}: unusable ({e})"
    if table is None:
        return f"none ({path} does not exist: no GPU run has measured one; CUDA attention takes SDPA where it can)"
    gated = ", ".join(f"{k} ({v})" for k, v in table.get("gated_out", {}).items()) or "nothing"
    return (f"{path}: measured on {table['device']} (compute capability {table['capability']}) on "
            f"{table.get('date', '?')}; Triton forward {table['forward']}, dQ {table.get('dq', 'separate')}; "
            f"{len(table.get('cases', []))} cases; gated out: {gated}")


# --- what explain, demo and evaluate share ---------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _LineBar:
    """A progress bar for a log: a line `desc: n/total unit` on stderr per step (at most about 20 per bar, and the
    last), for output that is not a terminal, where tqdm's bars would be either off or a mess of carriage returns."""

    def __init__(self, total=None, desc="", unit="it", disable=False, **_):
        self.total, self.desc, self.unit, self.disable, self.n = total, desc, unit, disable, 0

    def update(self, n=1):
        self.n += n
        every = max(1, (self.total or 0) // 20)
        if not self.disable and (self.n % every == 0 or self.n == self.total):
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc}: {self.n}{of} {self.unit}{'s' if self.total != 1 else ''}", file=sys.stderr,
                  flush=True)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _bar_factory(quiet, lines=False):
    """bar(total=, desc=, unit=, disable=): tqdm bars on a terminal; with lines=True, _LineBar lines when stderr is
    not a terminal (a log, CI); nothing with quiet. transformers' and huggingface_hub's own bars (loading, saving,
    downloading) show only on a terminal, and not with quiet."""
    from tqdm.auto import tqdm

    if quiet or not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        disable_progress_bars()
    as_lines = lines and not quiet and not sys.stderr.isatty()

    def bar(disable=None, **kw):
        if as_lines:
            return _LineBar(disable=bool(disable), **kw)
        return tqdm(disable=True if quiet else disable, leave=False, dynamic_ncols=True, **kw)
    return bar


def _layer_progress(bar, n_layers, label, backward_passes=1):
    """A progress(event) callback for af.explain with one bar for the forward and one for the backward passes."""
    bars = {}
    totals = {"forward": n_layers, "backward": n_layers * backward_passes}

    def progress(event):
        total = totals.get(event, n_layers)
        if event not in bars:
            passes = f" ({backward_passes} passes)" if event == "backward" and backward_passes > 1 else ""
            bars[event] = bar(total=total, desc=f"{label}: {event}{passes}", unit="layer")
        bars[event].update()
        if bars[event].n >= total:
            bars.pop(event).close()
    progress.close = lambda: [b.close() for b in bars.values()]
    return progress


def _print_summary(pieces, relevance, paths, lines):
    for line in lines:
        print(line)
    for line in report.summary(pieces, relevance, k=5):
        print(line)
    print("reports: " + ", ".join(str(p) for p in paths))


def _extend_json(path, extra):
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(extra)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


TINY = "tiny"   # --model tiny: a tiny random Llama built on the spot (attnlrp_fast.app.tiny)


def _load_model(args, device, dtype):
    """--model's causal LM and tokenizer; `tiny` (when no folder has that name) is built in a temporary folder."""
    import os

    if args.model != TINY or os.path.exists(args.model):
        return longdoc.load_model(args.model, device, dtype, known=(TINY,))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="attnlrp-tiny-") as folder:
        tiny.make_model(folder)
        return longdoc.load_model(folder, device, dtype)


def _document_path(args):
    """--document, or the shipped sample report when it is left out."""
    return args.document if args.document is not None else demo.sample_document_path()


@dataclass
class _Answer:
    """What explain and evaluate explain: the prompt and the answer's token ids."""
    prompt: longdoc.Prompt
    ids: list
    seconds: float | None    # spent generating the answer; None when --answer gave it


def _prompt_and_answer(args, model, tokenizer, document, bar, backend) -> _Answer:
    """The prompt (document + --question) and the answer: --answer's tokens, else the model's greedy answer."""
    longdoc.check_hops(args.hops_asked, args.reasoning, tokenizer)   # (no think tags: an error before generating)
    prompt = longdoc.build_prompt(tokenizer, document, args.question, chat=not args.no_chat)
    answer_ids = longdoc.tokenize_answer(tokenizer, args.answer) if args.answer is not None else None
    longdoc.check_length(model, prompt, len(answer_ids) if answer_ids else args.max_new_tokens, args.model,
                         generated=answer_ids is None)
    if answer_ids is not None:
        return _Answer(prompt, answer_ids, None)
    t = time.perf_counter()
    with bar(total=args.max_new_tokens, desc="generating the answer", unit="token") as b:
        answer_ids = longdoc.generate_answer(model, tokenizer, prompt.ids, args.max_new_tokens, tick=b.update,
                                             backend=backend)
    return _Answer(prompt, answer_ids, time.perf_counter() - t)


# --- explain ---------------------------------------------------------------------------------------------------
def _check_hops(args):
    """--hops against --reasoning (longdoc.check_hops); args.hops becomes the hops to run, args.hops_asked keeps
    what was given (None: nothing)."""
    args.hops_asked, args.hops = args.hops, longdoc.check_hops(args.hops, args.reasoning)


def _check_explain_options(args):
    _check_hops(args)
    if args.mlp_chunk < 0:
        raise UsageError(f"--mlp-chunk must be 0 (no chunking) or a positive number of tokens, got {args.mlp_chunk}")
    if args.answer is None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


def _reasoning(args, tokenizer, answer):
    """The ReasoningSpan --reasoning asks for (None: none, or auto found no reasoning block)."""
    if args.reasoning == "none":
        return None
    if args.reasoning == "auto":
        span = longdoc.find_reasoning(tokenizer, answer.prompt.ids, answer.ids,
                                      args.max_new_tokens if args.answer is None else None)
        longdoc.check_found_reasoning(args.hops_asked, tokenizer, span)
        return span
    return longdoc.reasoning_from_option(args.reasoning, answer.prompt.ids, answer.ids)


def _explain_answer(args, model, answer, backend, bar, reasoning=None):
    """longdoc.explain_answer with progress bars: the layers forward and backward (one backward per hop with a
    reasoning span), and with --per-token the answer tokens."""
    from attnlrp_fast.memory import transformer_layers

    n_tokens = len(answer.prompt.ids) + len(answer.ids)
    passes = 1 + (args.hops if reasoning is not None else 0)
    progress = _layer_progress(bar, len(transformer_layers(model)), f"explaining {n_tokens} tokens",
                               backward_passes=passes)
    quiet_tokens = args.quiet or not args.per_token
    with bar(total=len(answer.ids), desc="answer tokens", unit="token", disable=True if quiet_tokens else None) as b:
        result = longdoc.explain_answer(model, answer.prompt, answer.ids, args.rule, backend, per_token=args.per_token,
                                        checkpoint=not args.no_checkpoint, mlp_chunk=args.mlp_chunk,
                                        progress=progress, token_tick=b.update, reasoning=reasoning,
                                        hops=args.hops, seed=args.reasoning_seed)
    progress.close()
    return result


def _other_prompt_tokens(prompt, relevance):
    """The prompt's tokens outside the document (question, chat template) with their relevance."""
    a, b = prompt.doc_start, prompt.doc_end
    return [{"index": i, "token": prompt.token_text[i], "relevance": relevance[i]}
            for i in range(len(prompt.ids)) if not a <= i < b]


@dataclass
class _Explained:
    """An explained answer, as the reports and the summary show it."""
    answer: _Answer
    text: str                 # the answer, decoded (with a reasoning span: all of it, reasoning included)
    pieces: list              # each answer token, decoded
    result: longdoc.Result
    others: list              # _other_prompt_tokens
    answer_text: str          # the answer explained, decoded (with a reasoning span: what follows it)
    reasoning: tuple | None   # (reasoning tokens' text, their hop-0 relevance) with a reasoning span
    think_tags: bool          # whether the tokenizer has think tags (a reasoning model)
    groups: list              # the document tokens as the reports show them (longdoc.character_groups)

    @classmethod
    def of(cls, answer, result, tokenizer):
        text, reasoning = tokenizer.decode(answer.ids), None
        answer_text = text
        if result.hops is not None:
            ids = answer.prompt.ids + answer.ids
            reasoning = reasoning_report.reasoning_tokens(tokenizer, ids, result.hops)
            answer_text = tokenizer.decode(ids[result.hops.span.answer_start:])
        prompt = answer.prompt
        return cls(answer, text, [tokenizer.decode([i]) for i in answer.ids], result,
                   _other_prompt_tokens(prompt, result.relevance), answer_text, reasoning,
                   longdoc.think_tags(tokenizer) is not None,
                   longdoc.character_groups(tokenizer, prompt.ids[prompt.doc_start:prompt.doc_end]))

    @property
    def document(self):
        return slice(self.answer.prompt.doc_start, self.answer.prompt.doc_end)

    @property
    def document_relevance(self):
        """The relevance the reports show on the document: with a reasoning span all hops' together."""
        hops = self.result.hops
        return (hops.prompt_total if hops is not None else self.result.relevance)[self.document]


def _explanation_facts(args, device, dtype, backend, done):
    """The explanation's facts: the JSON report's top-level fields and the page's table."""
    prompt, rel = done.answer.prompt, done.result.relevance
    return {
        "model": args.model, "rule": args.rule, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "backend": backend or "triton", "question": args.question, "answer": done.answer_text,
        "answer_source": "given" if args.answer is not None else "greedy",
        "target_logit": sum(done.result.target_logits),
        "prompt_tokens": len(prompt.ids), "document_tokens": prompt.doc_end - prompt.doc_start,
        "relevance_total": sum(rel), "relevance_document": sum(rel[done.document]),
        "relevance_question_and_template": sum(o["relevance"] for o in done.others),
        "relevance_earlier_answer_tokens": sum(rel[len(prompt.ids):]),
        **_reasoning_facts(done),
    }


def _reasoning_facts(done):
    hops = done.result.hops
    if hops is None:
        return {}
    return {"reasoning": hops.span.source, "reasoning_tokens": hops.span.end - hops.span.start, "hops": hops.hops,
            "reasoning_seed": hops.seed, "relevance_document_all_hops": sum(done.document_relevance),
            "share_left_in_reasoning": f"{hops.share[-1]:.1%}"}


def _warnings(args):
    """What the terminal, the page and the JSON report warn of."""
    return ([f"--model {TINY}: a random 2-layer Llama built here, so the answer is noise; this run shows the command "
             "and its reports, not a real explanation"] if args.model == TINY else [])


def _write_explanation(args, done, facts):
    """explanation.json, .html (with one map per answer token under --per-token) and, for documents of 200 tokens
    or more, relevance.png; returns their paths."""
    doc = done.document
    maps, extra, label = None, "", "per-token map"
    if args.per_token:
        maps = {f"{j}: {done.pieces[j]!r}": r[doc] for j, r in done.result.per_token}
    hops = done.result.hops
    if hops is not None:
        maps, label = reasoning_report.document_maps(hops, doc), "hop"
        extra = reasoning_report.html_section(*done.reasoning, hops, doc)
    title = f"Why the model answered {done.answer_text.strip()[:80]!r}"
    maps = {k: report.sum_groups(done.groups, v) for k, v in maps.items()} if maps else None   # characters whole
    return report.write_reports(args.out, report.join_groups(done.groups, done.answer.prompt.pieces),
                                report.sum_groups(done.groups, done.document_relevance), title=title,
                                maps=maps, maps_label=label, extra_html=extra, warnings=_warnings(args),
                                plot=facts["document_tokens"] >= 200, **facts)


def _explain_lines(args, device, done, facts):
    total = facts["relevance_total"]
    share = facts["relevance_document"] / total if total else float("nan")
    n_tokens = len(done.answer.prompt.ids) + len(done.answer.ids)
    lines = _warnings(args) + [
        f"answer ({facts['answer_source']}): {done.answer_text.strip()!r}",
        (f"explained {n_tokens} tokens with {args.rule} in {done.result.seconds:.1f} s on {device}; "
         f"target logit {facts['target_logit']:.4g}, relevance total {total:.4g}, {share:.0%} of it on the document"),
    ]
    if done.result.hops is not None:
        lines[-1] += " (hop 0)"
        lines += reasoning_report.summary_lines(done.result.hops, done.document)
        lines.append("top passages below: all hops together")
    elif args.reasoning == "auto" and done.think_tags:
        lines.append("reasoning: none found (the tokenizer has think tags, but the answer holds no block)")
    return lines


def _explain_image(args):
    """explain --image: app/vlm.py's job (a vision-language model, its processor, the images and the question)."""
    import os

    from attnlrp_fast.app import vlm

    t0 = time.perf_counter()
    if args.document is not None:
        raise UsageError("--image and --document: explain images with a question, or a document, not both")
    if args.per_token:
        raise UsageError("--per-token is not available with --image")
    if args.model == TINY and not os.path.exists(args.model):
        raise UsageError(f"--image: --model {TINY} is a text-only Llama; images need a vision-language model folder")
    images = vlm.load_images(args.image)
    device = _choose_device(args.device)
    dtype = _choose_dtype(args.dtype, device)
    _check_explain_options(args)
    backend = _choose_backend(args.backend, device, dtype, many_passes=True)
    _bar_factory(args.quiet)   # --quiet: no loading bars
    model, processor = vlm.load_model(args.model, device, dtype)
    try:
        prompt = vlm.build_prompt(processor, images, args.question, chat=not args.no_chat)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--image: the processor cannot build the prompt ({str(e).splitlines()[0]})") from None
    answer_ids = longdoc.tokenize_answer(processor.tokenizer, args.answer) if args.answer is not None else None
    vlm.check_length(model, prompt, len(answer_ids) if answer_ids else args.max_new_tokens, args.model)
    if answer_ids is None:
        answer_ids = vlm.generate_answer(model, processor, prompt, args.max_new_tokens, backend=backend)
    reasoning = _reasoning(args, processor.tokenizer, _Answer(prompt, answer_ids, None))
    result = vlm.explain_answer(model, prompt, answer_ids, args.rule, backend, reasoning=reasoning, hops=args.hops,
                                seed=args.reasoning_seed)
    text = processor.tokenizer.decode(answer_ids[reasoning.answer_start - len(prompt.ids):] if reasoning else answer_ids)
    facts = {"model": args.model, "rule": args.rule, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
             "backend": backend or "triton", "question": args.question, "answer": text,
             "answer_source": "given" if args.answer is not None else "greedy", "images": list(args.image),
             "target_logit": sum(result.target_logits), "prompt_tokens": len(prompt.ids),
             "image_tokens": sum(t == prompt.image_token_id for t in prompt.ids)}
    paths = vlm.write_reports(args.out, prompt, result, vlm.seen_images(processor, prompt.inputs["pixel_values"]),
                              title=f"Why the model answered {text.strip()[:80]!r}", facts=facts)
    _extend_json(paths[0], {"answer_token_ids": answer_ids, "seconds": time.perf_counter() - t0})
    print(f"answer ({facts['answer_source']}): {text.strip()!r}")
    print(f"explained {len(prompt.ids) + len(answer_ids)} tokens ({facts['image_tokens']} image tokens) and "
          f"{len(images)} image(s) with {args.rule} in {result.seconds:.1f} s on {device}")
    for line in vlm.summary(prompt, result):
        print(line)
    print("reports: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_explain(args):
    if args.image:
        return _explain_image(args)
    t0 = time.perf_counter()
    document = longdoc.read_document(_document_path(args))
    device = _choose_device(args.device)
    dtype = _choose_dtype(args.dtype, device)
    _check_explain_options(args)
    backend = _choose_backend(args.backend, device, dtype, many_passes=True)
    bar = _bar_factory(args.quiet)
    model, tokenizer = _load_model(args, device, dtype)
    timings = {"load": time.perf_counter() - t0}

    answer = _prompt_and_answer(args, model, tokenizer, document, bar, backend)
    if answer.seconds is not None:
        timings["generate"] = answer.seconds
    result = _explain_answer(args, model, answer, backend, bar, _reasoning(args, tokenizer, answer))
    timings["explain"] = result.seconds

    t = time.perf_counter()
    done = _Explained.of(answer, result, tokenizer)
    facts = _explanation_facts(args, device, dtype, backend, done)
    paths = _write_explanation(args, done, facts)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    _extend_json(paths[0], {
        "answer_tokens": done.pieces, "answer_token_ids": answer.ids, "target_logits": result.target_logits,
        "other_prompt_tokens": done.others, "timings": timings,
        **(reasoning_report.json_fields(*done.reasoning, result.hops, done.document, done.groups)
           if result.hops else {}),
    })
    _print_summary(answer.prompt.pieces, done.document_relevance, paths,
                   _explain_lines(args, device, done, facts))
    return 0


# --- demo ------------------------------------------------------------------------------------------------------
def _demo_html(r):
    """The page's extra sections: the passages ranked by similarity, and the query tokens as a heatmap."""
    import html

    explained = {e.index for e in r.explained}
    items = []
    for i in r.ranked[:10]:
        p = r.passages[i]
        mark = " (explained)" if i in explained else ""
        items.append(f"<li>{p.score:.3f}{mark}: {html.escape(p.text[:160])}{'...' if len(p.text) > 160 else ''}</li>")
    return (f"<h2>Passages ranked by similarity to the query</h2><ol>{''.join(items)}</ol>"
            f"<h2>Query tokens that match the best passage</h2>"
            f"<p>{report.inline_heatmap(r.query_match.tokens, r.query_match.relevance)}</p>")


def _demo_passages(r):
    """The JSON report's passages, best first; the explained ones with their wordpieces' relevance."""
    explained = {e.index: e.match for e in r.explained}
    rows = []
    for rank, i in enumerate(r.ranked, 1):
        p = r.passages[i]
        row = {"rank": rank, "score": p.score, "start_char": p.start, "end_char": p.end, "text": p.text,
               "explained": i in explained}
        if i in explained:
            match = explained[i]
            row.update(similarity_explained=match.similarity, wordpieces=match.tokens,
                       wordpiece_relevance=match.relevance)
        rows.append(row)
    return rows


def _demo_lines(r, query, device, top):
    lines = [f"query: {query!r}; {len(r.passages)} passages ranked with {r.model} on {device}",
             "best passages (cosine similarity):"]
    for i in r.ranked[:top]:
        p = r.passages[i]
        lines.append(f"  {p.score:.3f}  {' '.join(p.text.split())[:90]}...")
    q_top = sorted(zip(r.query_match.tokens, r.query_match.relevance), key=lambda x: -x[1])[:4]
    lines.append("query tokens that match the best passage most: " + ", ".join(f"{t} ({v:.3f})" for t, v in q_top))
    return lines


def cmd_demo(args):
    t0 = time.perf_counter()
    device = _choose_device(args.device)
    path = args.document or demo.sample_document_path()
    document = longdoc.read_document(path)
    query = args.query if args.query is not None else demo.DEFAULT_QUERY
    if not query.strip():
        raise UsageError("--query is empty")
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    r = demo.run(document, query, top=args.top, device=device, rule=args.rule,
                 backend=dispatch.backend_for_many_passes(device), bar=_bar_factory(args.quiet))
    paths = report.write_reports(
        args.out, r.pieces, r.relevance, title=f"Which words make these passages match: {query}",
        extra_html=_demo_html(r), plot=True, model=r.model, query=query, rule=args.rule, device=str(device),
        document=str(path), passages_explained=len(r.explained))
    r.timings["total"] = time.perf_counter() - t0
    _extend_json(paths[0], {"passages": _demo_passages(r), "query_tokens": r.query_match.tokens,
                            "query_relevance": r.query_match.relevance, "timings": r.timings})
    _print_summary(r.pieces, r.relevance, paths, _demo_lines(r, query, device, args.top))
    return 0


# --- evaluate --------------------------------------------------------------------------------------------------
DOCUMENT_METHODS = ["attnlrp", "cp", "grad_x_input", "attention", "random"]   # evaluate's default on --document


def _check_evaluate_options(args):
    for flag, value in (("--steps", args.steps), ("--samples", args.samples), ("--ig-steps", args.ig_steps)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    _check_hops(args)
    if args.hops_asked is not None and args.model is None:
        raise UsageError("--hops goes with --model and --document (the shipped reasoning task runs one hop)")
    if (args.model is None) != (args.document is None):
        raise UsageError("--model and --document go together (evaluate on your own model and document)")
    if args.model is not None and args.task:
        raise UsageError("--task runs the shipped tasks; leave it out with --model / --document")


def _parse_methods(text, device):
    """--methods as a list (None when not given), each name known and its backend one that runs here."""
    from attnlrp_fast.evaluation import evaluate as ev

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


def _task_progress(bar, methods):
    """A progress(task, _) callback for faithfulness.run: one bar per task (over the methods for recall, over the
    sentence pairs for minilm); progress.close() closes them."""
    from attnlrp_fast.evaluation import faithfulness

    bars = {}

    def progress(task, _):
        if task not in bars:
            per_method = task != "minilm"
            total = {"recall": len(methods), "reasoning": len(faithfulness.reasoning_methods(methods)),
                     "minilm": len(faithfulness.sentence_pairs())}[task]
            bars[task] = bar(total=total, desc=f"evaluating: {task}", unit="method" if per_method else "pair")
        bars[task].update()
    progress.close = lambda: [b.close() for b in bars.values()]
    return progress


def _evaluate_shipped_tasks(args, device, methods, bar):
    from attnlrp_fast.evaluation import faithfulness

    tasks = args.task or list(faithfulness.TASKS)
    methods = methods or faithfulness.available_methods(device)
    progress = _task_progress(bar, methods)
    try:
        return faithfulness.run(tasks, methods, steps=args.steps, seed=args.seed, device=device, perturb=args.perturb,
                                samples=args.samples, ig_steps=args.ig_steps, progress=progress,
                                partial=lambda result: _write_json(args, result, partial=True))
    finally:
        progress.close()


def _evaluate_document(args, device, document, methods, bar):
    """The evaluation on --model and --document: the answer (given or generated) explained by each method."""
    from attnlrp_fast.evaluation import faithfulness
    dtype = _choose_dtype(args.dtype, device)
    model, tokenizer = _load_model(args, device, dtype)
    answer = _prompt_and_answer(args, model, tokenizer, document, bar, dispatch.backend_for_many_passes(device))
    reasoning = _reasoning(args, tokenizer, answer)
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
    import json
    from pathlib import Path

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
    from pathlib import Path

    from attnlrp_fast.evaluation import faithfulness

    paths = _write_json(args, result)
    return paths + [faithfulness.plot_curves(result, Path(args.out) / "curves.png")]


def cmd_evaluate(args):
    from attnlrp_fast.evaluation import faithfulness

    t0 = time.perf_counter()
    _check_evaluate_options(args)
    document = longdoc.read_document(args.document) if args.document else None
    device = _choose_device(args.device)
    methods = _parse_methods(args.methods, device)
    bar = _bar_factory(args.quiet, lines=True)
    if document is None:
        result = _evaluate_shipped_tasks(args, device, methods, bar)
    else:
        result = _evaluate_document(args, device, document, methods, bar)
    result["seconds"] = time.perf_counter() - t0
    paths = _write_evaluation(args, result)
    print(faithfulness.table(result))
    for task, out in result["tasks"].items():
        if "model_accuracy" in out:
            print(f"{task}: the model answers {out['model_accuracy']:.1%} of the {out['samples']} samples correctly")
    print("reports: " + ", ".join(str(p) for p in paths))
    return 0


# --- the command line ------------------------------------------------------------------------------------------
def _add_explain(sub):
    """The `explain` command's options."""
    e = sub.add_parser("explain", help="which parts of a document made a causal LM give its answer")
    e.add_argument("--model", required=True,
                   help=f"a local model folder or a hub id; `{TINY}`: a tiny random Llama built here, no download "
                        "(answers are noise: for trying the command)")
    e.add_argument("--document", default=None, help="UTF-8 text file (default: the shipped sample report)")
    e.add_argument("--image", action="append", default=None,
                   help="an image file (repeatable) for a vision-language model (LLaVA) folder: explain its answer to "
                        "--question over the image regions and the words")
    e.add_argument("--question", default=None, help="asked after the document (default: none, the document alone)")
    e.add_argument("--answer", default=None, help="explain this answer (default: generate one greedily)")
    e.add_argument("--rule", choices=RULE_CHOICES, default="attnlrp")
    e.add_argument("--out", default="attnlrp-report", help="folder for explanation.json/.html/.png")
    e.add_argument("--device", choices=DEVICES, default="auto")
    e.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bfloat16 on CUDA (float16 without bf16), float32 on CPU")
    e.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: Triton kernels on CUDA, the chunked torch path on CPU")
    e.add_argument("--no-chat", action="store_true", help="plain text prompt even if the tokenizer has a chat template")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--per-token", action="store_true", help="also one relevance map per answer token")
    e.add_argument("--no-checkpoint", action="store_true",
                   help="keep every layer's activations (faster, memory grows with layers x length)")
    e.add_argument("--mlp-chunk", type=int, default=1024, help="tokens per MLP chunk (0: no chunking)")
    e.add_argument("--reasoning", default="auto",
                   help="auto (default): a reasoning model's <think> ... </think> block in the answer, when the "
                        "tokenizer has those tags; none; or START:END, answer tokens START..END-1 as the reasoning "
                        "(the answer explained: the tokens from END on). Relevance then also flows through the "
                        "reasoning back to the document, one backward pass per hop")
    e.add_argument("--hops", type=int, default=None,
                   help="hops through the reasoning (default 3); an error where there is no reasoning span")
    e.add_argument("--reasoning-seed", choices=("positive", "signed"), default=None,
                   help="what each hop passes on: the positive part of each reasoning token's relevance (default) "
                        "or all of it")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_explain)


def _add_demo(sub):
    """The `demo` command's options."""
    d = sub.add_parser("demo", help="offline demo on the embedded MiniLM and a shipped long document")
    d.add_argument("--out", default="attnlrp-demo", help="folder for explanation.json/.html/.png")
    d.add_argument("--query", default=None, help="what to look for in the document")
    d.add_argument("--document", default=None, help="UTF-8 text file (default: the shipped sample report)")
    d.add_argument("--top", type=int, default=3, help="how many top passages to explain")
    d.add_argument("--rule", choices=RULE_CHOICES, default="attnlrp")
    d.add_argument("--device", choices=DEVICES, default="auto")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)


def _add_evaluate(sub):
    """The `evaluate` command's options."""
    v = sub.add_parser("evaluate", help="faithfulness of AttnLRP and baselines: perturbation curves, ABPC, pointing")
    v.add_argument("--task", action="append", choices=("recall", "minilm", "reasoning"),
                   help="a shipped task (repeatable; default: all): recall (tiny Llama, ground-truth evidence), "
                        "minilm (real MiniLM weights, sentence-pair similarity), reasoning (tiny Llama answering "
                        "through a reasoning token: one hop against the hop methods)")
    v.add_argument("--model", default=None,
                   help=f"your causal LM (local folder or hub id; `{TINY}`: a tiny random Llama), with --document")
    v.add_argument("--document", default=None, help="UTF-8 text file, with --model")
    v.add_argument("--question", default=None)
    v.add_argument("--answer", default=None, help="explain this answer (default: generate one greedily)")
    v.add_argument("--no-chat", action="store_true")
    v.add_argument("--max-new-tokens", type=int, default=16)
    v.add_argument("--reasoning", default="auto", help="as in explain: the answer's reasoning block (auto, none or "
                                                        "START:END); the hop methods join the evaluation")
    v.add_argument("--hops", type=int, default=None,
                   help="hops through the reasoning for the hop methods (default 3); only with a reasoning span")
    v.add_argument("--methods", default=None,
                   help="comma-separated, of attnlrp, cp, grad_x_input, integrated_gradients, attention, random "
                        "(name[torch] / name[triton] for a backend); default: all, AttnLRP on each backend here")
    v.add_argument("--steps", type=int, default=10, help="perturbation steps from 0 to all eligible tokens")
    v.add_argument("--perturb", choices=("zero", "token"), default="zero",
                   help="zero the removed tokens' input embeddings, or put in a pad / mask token")
    v.add_argument("--samples", type=int, default=64, help="recall sequences")
    v.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients path points")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", choices=DEVICES, default="auto")
    v.add_argument("--dtype", choices=DTYPES, default="auto")
    v.add_argument("--out", default="attnlrp-eval", help="folder for evaluation.json and curves.png")
    v.add_argument("--json", default=None, help="also write the result JSON here")
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    v.set_defaults(func=cmd_evaluate)


def _add_check(sub):
    """The `check` command's options."""
    c = sub.add_parser("check", help="check the attention engine against the float64 reference on this machine")
    c.add_argument("--device", choices=DEVICES, default="auto")
    c.add_argument("--dtype", choices=DTYPES, default="auto")
    c.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: Triton on CUDA (and in the interpreter), the torch path on CPU")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_check)


def cmd_estimate(args):
    from attnlrp_fast.app import estimate_cmd

    try:
        for lines in estimate_cmd.tables(args, _bar_factory(False, lines=True)):   # each table as it is done
            print("\n".join(lines), flush=True)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    return 0


def _add_estimate(sub):
    s = sub.add_parser("estimate", help="memory of one explanation per length, for any model, from its config alone")
    s.add_argument("--model", required=True, help="a shipped shape (llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, "
                   "gemma-2-9b, mistral-7b), a config JSON file, a model folder or a hub id")
    s.add_argument("--tokens", default="8k,32k,128k", help="lengths, e.g. 8k,32k,128k,1m (k = 1024)")
    s.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    s.add_argument("--gpu-memory", default=None, help="also find the longest document that fits, e.g. 80GiB")
    s.add_argument("--mlp-chunk", type=int, default=1024, help="tokens per MLP chunk in low_memory mode")
    s.add_argument("--modes", nargs="+", choices=ESTIMATE_MODES, default=list(ESTIMATE_MODES))
    s.set_defaults(func=cmd_estimate)


def cmd_make_model(args):
    from pathlib import Path

    out = Path(args.folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"make-model {args.folder}: exists and is not an empty folder")
    for flag, value, low in (("--layers", args.layers, 1), ("--hidden", args.hidden, 16)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if args.hidden % 16:
        raise UsageError(f"--hidden must be a multiple of 16 (4 heads of at least 4 dims), got {args.hidden}")
    tiny.make_model(out, layers=args.layers, hidden=args.hidden)
    print(f"wrote a tiny random Llama ({args.layers} layers, hidden {args.hidden}) with a BPE tokenizer and a chat "
          f"template to {out}; its answers are noise (random weights). Try:\n"
          f"  attnlrp-fast explain --model {out} --question \"What caused the contamination?\"")
    return 0


def _add_make_model(sub):
    m = sub.add_parser("make-model", help="save a tiny random Llama with a tokenizer to a folder (no download)")
    m.add_argument("folder", help="a new or empty folder")
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--hidden", type=int, default=64)
    m.set_defaults(func=cmd_make_model)


def build_parser():
    p = _Parser(prog="attnlrp-fast", description="AttnLRP explanations with fused Triton kernels")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_explain, _add_demo, _add_evaluate, _add_check, _add_estimate, _add_make_model):
        add(sub)
    i = sub.add_parser("info", help="versions, devices and backend choice")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)   # --help and option errors end here, before torch is imported
    from attnlrp_fast.minilm import NotInstalled
    from attnlrp_fast.models import UnsupportedModelError

    try:
        return args.func(args)
    except (UsageError, longdoc.InputError, UnsupportedModelError, NotInstalled) as e:
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
