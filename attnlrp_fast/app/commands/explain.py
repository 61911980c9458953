"""`attnlrp-fast explain`: which parts of a document made a causal LM give its answer (with a reasoning span, hop by
hop through the reasoning back to the document); explanation.json, .html and, for long documents, relevance.png,
and a summary. With --image the job is app/vlm.py's (explain_images)."""

import time
from dataclasses import dataclass

from attnlrp_fast.app import demo, longdoc, reasoning_report, report, vlm
from attnlrp_fast.app.common import (TINY, Answer, bar_factory, check_explain_options, choose_backend, choose_device,
                                     choose_dtype, extend_json, layer_progress, load_model,
                                     print_summary, prompt_and_answer, reasoning_span, torchrun_ranks)
from attnlrp_fast.host_memory import PeakMemory
from attnlrp_fast.memory import transformer_layers


def _document_path(args):
    """--document, or the shipped sample report when it is left out (then --question defaults to a question about
    it, demo.SAMPLE_QUESTION)."""
    if args.document is not None:
        return args.document
    if args.question is None:
        args.question = demo.SAMPLE_QUESTION
    return demo.sample_document_path()


def _explain_answer(args, model, answer, backend, bar, reasoning=None):
    """longdoc.explain_answer with progress bars: the layers forward and backward (one backward per hop with a
    reasoning span), and with --per-token the answer tokens."""
    n_tokens = len(answer.prompt.ids) + len(answer.ids)
    passes = len(answer.ids) if args.per_token else 1 + (args.hops if reasoning is not None else 0)
    progress = layer_progress(bar, len(transformer_layers(model)), f"explaining {n_tokens} tokens",
                              backward_passes=passes)
    quiet_tokens = args.quiet or not args.per_token
    with bar(total=len(answer.ids), desc="answer tokens", unit="token", disable=True if quiet_tokens else None) as b:
        result = longdoc.explain_answer(model, answer.prompt, answer.ids, args.rule, backend, per_token=args.per_token,
                                        checkpoint=not args.no_checkpoint, mlp_chunk=args.mlp_chunk,
                                        offload=args.offload, seq_chunk=args.seq_chunk,
                                        progress=progress, token_tick=b.update, reasoning=reasoning,
                                        hops=args.hops, seed=args.reasoning_seed,
                                        context_parallel=True if args.context_parallel else None)
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
    answer: Answer
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


def run(args):
    if args.image:
        return vlm.explain_images(args)
    check_explain_options(args)
    ranks = torchrun_ranks(args) if args.context_parallel else None
    try:
        return _run(args, ranks)
    finally:
        if ranks is not None:
            ranks.close()


def _run(args, ranks):
    """The job; with --context-parallel (ranks) every process explains its shard and rank 0 writes the reports."""
    t0 = time.perf_counter()
    document = longdoc.read_document(_document_path(args))
    device = choose_device(args.device) if ranks is None else ranks.device
    dtype = choose_dtype(args.dtype, device)
    backend = choose_backend(args.backend, device, dtype, many_passes=True)
    if ranks is not None and ranks.rank != 0:
        args.quiet = True
    bar = bar_factory(args.quiet)
    model, tokenizer = load_model(args, device, dtype)
    if ranks is not None:
        ranks.join()
    timings = {"load": time.perf_counter() - t0}

    answer = prompt_and_answer(args, model, tokenizer, document, bar, backend)
    if answer.seconds is not None:
        timings["generate"] = answer.seconds
    reasoning = reasoning_span(args, tokenizer, answer)
    with PeakMemory(device) as peak:
        result = _explain_answer(args, model, answer, backend, bar, reasoning)
    timings["explain"] = result.seconds
    memory = {"explain_peak_mib": round(peak.extra_bytes / 2**20, 1), "measured": peak.what}
    if peak.files_bytes:
        memory["library_pages_loaded_mib"] = round(peak.files_bytes / 2**20, 1)
    if ranks is not None and ranks.rank != 0:
        return 0

    t = time.perf_counter()
    done = _Explained.of(answer, result, tokenizer)
    facts = _explanation_facts(args, device, dtype, backend, done)
    if ranks is not None:
        facts["context_parallel"] = {"ranks": ranks.world, "device_per_rank": str(device.type)}
    paths = _write_explanation(args, done, facts)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    extend_json(paths[0], {
        "answer_tokens": done.pieces, "answer_token_ids": answer.ids, "target_logits": result.target_logits,
        "other_prompt_tokens": done.others, "timings": timings, "memory": memory,
        **(reasoning_report.json_fields(*done.reasoning, result.hops, done.document, done.groups)
           if result.hops else {}),
    })
    print_summary(answer.prompt.pieces, done.document_relevance, paths,
                  _explain_lines(args, device, done, facts) + [
                      f"memory: {memory['explain_peak_mib']:.0f} MiB at most during the explanation "
                      f"({peak.what})"])
    return 0
