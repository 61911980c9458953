"""Prompts and greedy answers of a causal LM over a document: the prompt (the document plus a question, through the
model's chat template when its tokenizer has one) with the document's token range, and the model's greedy answer.
The long-document job (app/longdoc.py) and the needle task (evaluation/needle.py) build on them.
"""

from dataclasses import dataclass, field

import torch


class InputError(ValueError):
    """Bad input for the job (document, model, options): the CLI reports it as one line (as app/longdoc.py's
    InputError, the same class)."""


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
    first = 1 if getattr(model.config, "is_encoder_decoder", False) else inputs["input_ids"].shape[1]
    for t in out[0, first:].tolist():   # (an encoder-decoder's output is the decoder's: its start token, the answer)
        if t in eos:
            break
        answer.append(t)
    if not answer:
        raise InputError("the model's greedy answer is empty (it ended at once); pass the answer with --answer")
    return answer
