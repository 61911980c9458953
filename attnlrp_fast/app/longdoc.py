"""The long-document job behind `attnlrp-fast explain`: which parts of a document made a causal LM give its
answer.

    model, tok = load_model(path, device, dtype)
    prompt = build_prompt(tok, document, question, chat=True)
    answer = generate_answer(model, tok, prompt.ids, max_new_tokens=32)   # or tokenize_answer(tok, text)
    result = explain_answer(model, prompt, answer, rule="attnlrp")      # relevance of every prompt token

The prompt is the document plus the question, through the model's chat template when its tokenizer has one.
The explanation is one forward and one backward pass over prompt + answer with the target "sum of the answer
tokens' logits" (with per_token=True one backward pass per answer token over the one forward; their maps sum to
the joint one). Memory stays linear in the length: no KV cache in the explanation pass, logits only at the answer
positions, parameters without gradients, every layer checkpointed and MLPs in sequence chunks (af.low_memory).
"""

import contextlib
import time
from dataclasses import dataclass

import torch

# this job's API, defined in the core so that the evaluation shares them
from attnlrp_fast.prompts import InputError, Prompt, build_prompt, generate_answer, greedy  # noqa: F401


def read_document(path):
    """The document's text: UTF-8 (a BOM is dropped), not empty."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise InputError(f"--document {path}: no such file")
    if p.is_dir():
        raise InputError(f"--document {path} is a folder, not a text file")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"--document {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "convert it first, e.g. with iconv -t UTF-8") from None
    if not text.strip():
        raise InputError(f"--document {path} is empty")
    return text.replace("\r\n", "\n")


def _first_line(e):
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub's retry warnings off: a failure becomes one error line of ours."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_model(model_id, device, dtype, known=()):
    """A causal LM and its tokenizer from a local folder, the Hugging Face cache or the hub, with attention through
    the engine. A name that is none of these fails at once (attnlrp_fast/hub.py; `known`: other names the command
    takes, for its "did you mean")."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from attnlrp_fast import hub

    try:
        options = hub.from_pretrained_options(model_id, known)
    except ValueError as e:
        raise InputError(str(e)) from None
    try:
        with _quiet_hub():
            config = AutoConfig.from_pretrained(model_id, **options)
    except Exception as e:  # OSError (not found, offline), ValueError (unknown model type)
        where = ("cannot load its config" if os.path.exists(model_id) else
                 "no local folder of that name, and the hub did not give it")
        raise InputError(f"--model {model_id}: {where} ({_first_line(e)}){hub.did_you_mean(model_id, known)}") from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise InputError(f"--model {model_id} is a {', '.join(archs)}, not a causal language model; `explain` needs "
                         "a model that generates text (`attnlrp-fast demo` shows an encoder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **options)
    except Exception as e:
        raise InputError(f"--model {model_id}: cannot load its tokenizer ({_first_line(e)})") from None
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:   # an encoder-decoder (T5, BART): the prompt goes to the encoder, the answer is the decoder's
        model, info = auto.from_pretrained(model_id, dtype=dtype, attn_implementation="attnlrp_fast",
                                           output_loading_info=True, **options)
    except Exception as e:
        raise InputError(f"--model {model_id}: cannot load it as a causal LM ({_first_line(e)})") from None
    missing = [k for k in info.get("missing_keys", ()) if "rotary" not in k]
    if missing:
        raise InputError(f"--model {model_id}: the checkpoint lacks {len(missing)} weights of "
                         f"{type(model).__name__} (e.g. {sorted(missing)[0]}); it is not a causal LM checkpoint")
    return model.to(device).eval(), tokenizer


def context_length(model):
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def character_groups(tokenizer, ids, longest=4):
    """[start, end) ranges over `ids`, in order, each whole UTF-8 characters, for reports: a token whose own decode is
    not valid UTF-8 (it shows U+FFFD: part of a character that a byte-level tokenizer split over several tokens) is
    grouped with the tokens after it until the group decodes cleanly (at most `longest` tokens, a character's most
    bytes); every other token is a range of its own."""
    unique = sorted(set(ids))
    broken = {t for t, text in zip(unique, tokenizer.batch_decode([[t] for t in unique])) if "\ufffd" in text}
    groups, i = [], 0
    while i < len(ids):
        end = i + 1
        if ids[i] in broken:
            end = next((k for k in range(i + 2, min(len(ids), i + longest) + 1)
                        if "\ufffd" not in tokenizer.decode(ids[i:k])), end)
        groups.append((i, end))
        i = end
    return groups


def check_length(model, prompt, answer_tokens, model_id="", generated=False):
    """An InputError when prompt + answer_tokens (generated: the --max-new-tokens budget, else the --answer's tokens)
    is longer than the model's context, naming what to reduce and by how much."""
    limit = context_length(model)
    p, d = len(prompt.ids), prompt.doc_end - prompt.doc_start
    n = p + answer_tokens
    if limit is None or n <= limit:
        return
    answer = f"--max-new-tokens {answer_tokens}" if generated else f"the --answer's {answer_tokens} tokens"
    if p >= limit and n - limit > d:
        fix = f"the question and chat template alone take {p - d}: shorten the question"
    elif p >= limit:
        fix = f"the prompt alone does not fit: shorten the document by at least {n - limit} tokens"
    elif generated:
        fix = (f"lower --max-new-tokens to {limit - p} or less, or shorten the document by {n - limit} tokens to keep "
               f"{answer_tokens}")
    else:
        fix = f"shorten the document (or the --answer) by {n - limit} tokens"
    raise InputError(f"the prompt is {p} tokens (the document {d}, the question and chat template {p - d}) plus "
                     f"{answer} = {n}, more than the context of {model_id or type(model).__name__} ({limit} tokens); "
                     f"{fix}")


def tokenize_answer(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids:
        raise InputError("--answer is empty")
    return list(ids)


THINK_TAGS = (("<think>", "</think>"),)   # reasoning blocks `--reasoning auto` recognises


@dataclass(frozen=True)
class ReasoningSpan:
    """Where a reasoning model's reasoning is in prompt + answer (sequence positions): tokens [start, end) are the
    reasoning, the answer explained is the tokens from answer_start on (after the closing tag)."""
    start: int
    end: int
    answer_start: int
    source: str                # "auto (<think> ... </think>)" or "--reasoning START:END"


def think_tags(tokenizer):
    """(open tag, close tag, open id, close id) of the first of THINK_TAGS that are single tokens of the tokenizer's
    vocabulary, else None (not a reasoning model's tokenizer)."""
    vocab = tokenizer.get_vocab()
    for open_tag, close_tag in THINK_TAGS:
        if open_tag in vocab and close_tag in vocab:
            return open_tag, close_tag, vocab[open_tag], vocab[close_tag]
    return None


def find_reasoning(tokenizer, prompt_ids, answer_ids, max_new_tokens=None):
    """The reasoning block of prompt + answer by the tokenizer's think tags (THINK_TAGS), or None when the tokenizer
    has none or the answer holds no closing tag and no block was opened. The block opens at the last opening tag
    before the answer's last closing tag (in the prompt when the chat template puts it there), or where the answer
    starts when the template opened it without a token of its own."""
    tags = think_tags(tokenizer)
    if tags is None:
        return None
    open_tag, close_tag, o, c = tags
    p = len(prompt_ids)
    ids = list(prompt_ids) + list(answer_ids)
    closes = [i for i in range(p, len(ids)) if ids[i] == c]
    if not closes:
        if o in answer_ids or (prompt_ids and prompt_ids[-1] == o):
            more = f" (--max-new-tokens {max_new_tokens})" if max_new_tokens else ""
            raise InputError(f"the answer opens a {open_tag} block but does not close it{more}: raise "
                             "--max-new-tokens, or pass --reasoning none")
        return None
    end = closes[-1]
    opens = [i for i in range(end) if ids[i] == o]
    start = opens[-1] + 1 if opens else p
    if end + 1 >= len(ids):
        raise InputError(f"the answer ends with {close_tag}: there is no answer after the reasoning to explain "
                         "(raise --max-new-tokens)")
    if start >= end:
        return None          # an empty block: nothing to pass relevance through
    return ReasoningSpan(start, end, end + 1, f"auto ({open_tag} ... {close_tag})")


DEFAULT_HOPS = 3   # --hops when it is not given


def check_hops(hops, reasoning, tokenizer=None):
    """--hops (None: not given) as the job runs it: DEFAULT_HOPS when not given. Hops go through a reasoning span,
    so --hops is an InputError where there can be none: with --reasoning none, or with auto and a tokenizer without
    think tags (and, once the answer is there, where auto found no block: check_found_reasoning)."""
    if hops is None:
        return DEFAULT_HOPS
    if hops < 0:
        raise InputError(f"--hops must be 0 or more, got {hops}")
    if reasoning == "none":
        raise InputError(f"--hops {hops} goes through a reasoning span, and --reasoning none asks for none: leave "
                         "out --hops, or name the span (--reasoning auto or START:END)")
    if reasoning == "auto" and tokenizer is not None and think_tags(tokenizer) is None:
        tags = ", ".join(f"{o} ... {c}" for o, c in THINK_TAGS)
        raise InputError(f"--hops {hops} goes through a reasoning span, and the tokenizer has no think tags ({tags}) "
                         "for --reasoning auto to find one: name the span with --reasoning START:END, or leave out "
                         "--hops")
    return hops


def check_found_reasoning(hops, tokenizer, span):
    """After --reasoning auto looked at the answer: an InputError when --hops was given (not None) and no reasoning
    span was found."""
    if hops is None or span is not None:
        return
    check_hops(hops, "auto", tokenizer)
    open_tag, close_tag, _, _ = think_tags(tokenizer)
    raise InputError(f"--hops {hops} goes through a reasoning span, and the answer holds no {open_tag} ... "
                     f"{close_tag} block: name the span with --reasoning START:END, or leave out --hops")


def reasoning_from_option(text, prompt_ids, answer_ids):
    """--reasoning START:END over the answer's tokens (0 = the first answer token): tokens START .. END - 1 are the
    reasoning, the answer explained is the tokens from END on."""
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"--reasoning {text}: use auto, none or START:END (answer token indices)") from None
    n = len(answer_ids)
    if not 0 <= a < b < n:
        raise InputError(f"--reasoning {text}: need 0 <= START < END < {n} (the answer has {n} tokens and at least "
                         "one must follow the reasoning)")
    p = len(prompt_ids)
    if p + a < 1:
        raise InputError("--reasoning: the reasoning cannot start at the first token of the sequence")
    return ReasoningSpan(p + a, p + b, p + b, f"--reasoning {text}")


def answer_targets(prompt_length, answer_ids, reasoning=None):
    """(position, token) targets of the answer after a prompt of prompt_length tokens: every answer token, or with
    a ReasoningSpan those after it (each read at the position before it)."""
    first = reasoning.answer_start - prompt_length if reasoning is not None else 0
    return [(prompt_length - 1 + j, t) for j, t in enumerate(answer_ids) if j >= first]


@dataclass
class Hops:
    """A multi-hop explanation's results as lists (explain_answer with reasoning)."""
    span: ReasoningSpan
    hops: int
    seed: str
    relevance: list            # per hop: relevance per prompt + answer token
    prompt_total: list         # all hops' relevance on the prompt, per prompt token
    share: list                # per hop: the share of its relevance that stayed in the reasoning


@dataclass
class Result:
    relevance: list            # per prompt + answer token (the answer's own tokens explain later ones)
    per_token: list            # [(answer index, relevance list)] when per_token
    target_logits: list        # per answer token (explained)
    seconds: float
    hops: Hops | None = None   # with a reasoning span


def explain_answer(model, prompt, answer_ids, rule="attnlrp", backend=None, *, per_token=False, checkpoint=True,
                   mlp_chunk=1024, progress=None, token_tick=None, reasoning=None, hops=3, seed=None,
                   offload=None, seq_chunk=None, context_parallel=None):
    """Relevance of every token of prompt + answer for the answer's logits. reasoning: a ReasoningSpan; then the
    answer explained is the tokens after it, and `hops` more backward passes carry relevance through the reasoning
    to the prompt (af.explain's reasoning_span). context_parallel: af.explain's (every rank calls this alike)."""
    import attnlrp_fast as af

    device = next(model.parameters()).device
    if getattr(model.config, "is_encoder_decoder", False):
        return _explain_seq2seq(model, prompt, answer_ids, rule, backend, per_token, reasoning, progress, token_tick,
                                offload, seq_chunk)
    ids = torch.tensor([prompt.ids + answer_ids], device=device)
    p = len(prompt.ids)
    targets = answer_targets(p, answer_ids, reasoning)
    kw = dict(rule=rule, backend=backend, checkpoint=checkpoint, mlp_chunk=mlp_chunk, progress=progress,
              offload=offload, seq_chunk=seq_chunk)
    if context_parallel is not None:
        kw["context_parallel"] = context_parallel
    t = time.perf_counter()
    per, logits = [], []
    if reasoning is not None:
        if per_token:
            raise InputError("--per-token is not available with a reasoning span (pass --reasoning none)")
        e = af.explain(model, input_ids=ids, target=targets, reasoning_span=(reasoning.start, reasoning.end),
                       hops=hops, reasoning_seed=seed, **kw)
        found = Hops(reasoning, hops, e.reasoning_seed, e.hop_relevance[:, 0].cpu().tolist(),
                     e.prompt_relevance[0, :p].cpu().tolist(), e.reasoning_share[:, 0].cpu().tolist())
        return Result(e.relevance[0].cpu().tolist(), [], e.target_logits[0].cpu().tolist(), time.perf_counter() - t,
                      found)
    if per_token:   # one backward pass per answer token over one forward
        def tick(event):
            if event == "target":
                if token_tick:
                    token_tick()
            elif progress is not None:
                progress(event)
        e = af.explain(model, input_ids=ids, target=targets, per_target=True, **{**kw, "progress": tick})
        per = [(j, r.tolist()) for j, r in enumerate(e.target_relevance[0].cpu())]
    else:
        e = af.explain(model, input_ids=ids, target=targets, **kw)
    relevance = e.relevance[0].cpu().tolist()
    logits = e.target_logits[0].cpu().tolist()
    return Result(relevance, per, logits, time.perf_counter() - t)


def _explain_seq2seq(model, prompt, answer_ids, rule, backend, per_token, reasoning, progress, token_tick,
                     offload=None, seq_chunk=None):
    """explain_answer for an encoder-decoder model: the prompt is the encoder's input, the decoder reads its start
    token and the answer (token j predicted at decoder position j). The relevance comes back in the layout of a
    causal LM's, prompt tokens then answer tokens: the encoder's, then the decoder's past its start token."""
    import attnlrp_fast as af

    if reasoning is not None:
        raise InputError("--reasoning needs a causal LM (the answer of an encoder-decoder model has no reasoning "
                         "span here); pass --reasoning none")
    device = next(model.parameters()).device
    start = model.config.decoder_start_token_id
    if start is None:
        raise InputError(f"{type(model).__name__} has no decoder_start_token_id in its config")
    ids = torch.tensor([prompt.ids], device=device)
    dec = torch.tensor([[start] + answer_ids], device=device)
    targets = [(j, tok) for j, tok in enumerate(answer_ids)]
    kw = dict(rule=rule, backend=backend, decoder_input_ids=dec, target=targets, offload=offload, seq_chunk=seq_chunk)
    t = time.perf_counter()
    per = []
    if per_token:
        def tick(event):
            if event == "target" and token_tick:
                token_tick()
            elif event != "target" and progress is not None:
                progress(event)
        e = af.explain(model, input_ids=ids, per_target=True, progress=tick, **kw)
    else:
        e = af.explain(model, input_ids=ids, progress=progress, **kw)
    if per_token:   # (a target's relevance on the decoder tokens is not kept per target)
        per = [(j, r.tolist() + [0.0] * len(answer_ids)) for j, r in enumerate(e.target_relevance[0].cpu())]
    relevance = e.relevance[0].cpu().tolist() + e.decoder_relevance[0, 1:].cpu().tolist()
    return Result(relevance, per, e.target_logits[0].cpu().tolist(), time.perf_counter() - t)
