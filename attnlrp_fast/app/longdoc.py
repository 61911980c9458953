"""The long-document job behind `attnlrp-fast explain`: which parts of a document made a causal LM give its
answer.

    model, tok = load_model(path, device, dtype)
    prompt = build_prompt(tok, document, question, chat=True)
    answer = generate_answer(model, tok, prompt.ids, max_new_tokens=32)   # or tokenize_answer(tok, text)
    result = explain_answer(model, prompt, answer, rule="attnlrp")      # relevance of every prompt token

The prompt is the document plus the question, through the model's chat template when its tokenizer has one.
The explanation is one forward and one backward pass over prompt + answer with the target "sum of the answer
tokens' logits" (or one pass per answer token with per_token=True; their maps sum to the joint one). Memory
stays linear in the length: no KV cache in the explanation pass, logits only at the answer positions,
parameters without gradients, every layer checkpointed and MLPs in sequence chunks (af.low_memory).
"""

import contextlib
import time
from dataclasses import dataclass, field

import torch


class InputError(ValueError):
    """Bad input for the job (document, model, options): the CLI reports it as one line."""


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

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, attn_implementation="attnlrp_fast",
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


@dataclass
class Prompt:
    text: str
    ids: list                 # prompt token ids
    doc_start: int            # token range of the document inside the prompt
    doc_end: int
    pieces: list              # text of each document token (joined: the document); len = doc_end - doc_start
    token_text: list = field(default_factory=list)   # a readable string for every prompt token


def build_prompt(tokenizer, document, question=None, chat=True):
    """Document + question as the model's user turn (chat template) or as plain text."""
    question = (question or "").strip()
    use_chat = chat and getattr(tokenizer, "chat_template", None)
    body = document.strip() if use_chat else (document.rstrip() if question else document)
    if use_chat:
        content = f"{body}\n\n{question}" if question else body
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        special = False
    else:
        text = f"{body}\n\nQuestion: {question}\nAnswer:" if question else body
        special = True
    start = text.find(body)
    if start < 0:
        raise InputError("the chat template changed the document's text, so its tokens cannot be located; "
                         "use --no-chat")
    end = start + len(body)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; this job "
                         "needs a fast (tokenizers-backed) tokenizer")
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True,
                    verbose=False)   # no "longer than the maximum" warning: check_length reports it
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not inside:
        raise InputError("the document produced no tokens")
    t0, t1 = inside[0], inside[-1] + 1
    starts = [start] + [min(max(offsets[i][0], start), end) for i in range(t0 + 1, t1)] + [end]
    pieces = [text[starts[i]:starts[i + 1]] for i in range(t1 - t0)]
    token_text = [text[s:e] if e > s else tokenizer.convert_ids_to_tokens(t) for t, (s, e) in zip(ids, offsets)]
    return Prompt(text, ids, t0, t1, pieces, token_text)


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


def _eos_ids(model, tokenizer):
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class _Ticker:
    """A generate() streamer that advances a progress callback per new token."""

    def __init__(self, tick):
        self.tick, self.first = tick, True

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        self.tick()

    def end(self):
        pass


def generate_answer(model, tokenizer, prompt_ids, max_new_tokens=32, tick=None, backend=None):
    """Greedy answer token ids (without the end-of-sequence token). `backend` as in af.attention (None: auto)."""
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    return greedy(model, tokenizer, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens,
                  backend, streamer=_Ticker(tick) if tick else None)


def greedy(model, tokenizer, inputs, max_new_tokens, backend=None, streamer=None):
    """The greedy continuation of the model inputs (input_ids (1, P) and what else the model takes) up to its
    end-of-sequence token, as a list of ids; InputError when it is empty."""
    from attnlrp_fast.lrp_patch import attention_backend

    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    with torch.no_grad(), attention_backend(model, backend):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=pad, streamer=streamer)
    answer = []
    for t in out[0, inputs["input_ids"].shape[1]:].tolist():
        if t in eos:
            break
        answer.append(t)
    if not answer:
        raise InputError("the model's greedy answer is empty (it ended at once); pass the answer with --answer")
    return answer


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
                   mlp_chunk=1024, progress=None, token_tick=None, reasoning=None, hops=3, seed=None):
    """Relevance of every token of prompt + answer for the answer's logits. reasoning: a ReasoningSpan; then the
    answer explained is the tokens after it, and `hops` more backward passes carry relevance through the reasoning
    to the prompt (af.explain's reasoning_span)."""
    import attnlrp_fast as af

    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids + answer_ids], device=device)
    p = len(prompt.ids)
    targets = answer_targets(p, answer_ids, reasoning)
    kw = dict(rule=rule, backend=backend, checkpoint=checkpoint, mlp_chunk=mlp_chunk, progress=progress)
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
    if per_token:
        total = None
        for j, target in enumerate(targets):
            e = af.explain(model, input_ids=ids, target=[target], **kw)
            rel = e.relevance[0].double().cpu()
            total = rel if total is None else total + rel
            per.append((j, rel.float().tolist()))
            logits.append(float(e.target_logit[0]))
            if token_tick:
                token_tick()
        relevance = total.float().tolist()
    else:
        e = af.explain(model, input_ids=ids, target=targets, **kw)
        relevance = e.relevance[0].cpu().tolist()
        logits = e.target_logits[0].cpu().tolist()
    return Result(relevance, per, logits, time.perf_counter() - t)
