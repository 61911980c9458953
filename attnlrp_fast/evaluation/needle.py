"""The needle task: faithfulness where the truth is known, on a real instruct LLM (SmolLM2-135M-Instruct by default,
attnlrp_fast/smollm2.py) and a real long document.

A sample: the shipped sample report (its paragraphs repeated from the start where a length asks for more than the
report's 4.8k tokens), cut to `length` - HEADROOM tokens at a sentence end (room for the chat template, the question
and the answer in the model's context), with one generated fact inserted as a paragraph of its own at a random
paragraph boundary (the needle: an access code, a person's name, a date or a place, from several templates), and the
question that asks for it. The model answers greedily (at most MAX_ANSWER tokens); a sample whose answer lacks the
fact is counted and left out. The target is the sum of the answer tokens' logits (what `attnlrp-fast explain`
explains); the tokens ranked and removed are the document's; the evidence is the needle sentence's tokens.

Per method (evaluate.METHODS): pointing (is the most relevant document token in the needle sentence), the rank of
the needle's best token among the document's, the needle's share of the document's positive relevance, ABPC and
RISE / MAS / RISE+AP of the answer (curves=False leaves the perturbation metrics out: at 8k tokens each method's
curves cost tens of forward passes), and the seconds per explanation. The gradient methods checkpoint every layer
(as `explain` does), so that a long document's explanation fits in a CPU's memory.

    attnlrp-fast evaluate --task needle [--lengths 1k,2k,4k,8k] [--samples 4] [--curves-up-to 2k]
"""

import random
import time
from dataclasses import dataclass

import torch

from attnlrp_fast.evaluation import evaluate as ev
from attnlrp_fast.evaluation.paper_baselines import Options

LENGTHS = (1024, 2048, 4096, 8192)
HEADROOM = 128          # tokens of each length left for the chat template, the question and the answer
MAX_ANSWER = 24

GATES = ("north", "south", "east", "west", "quarry", "river")
SITES = ("Ashby", "Coldharbour", "Fenwick", "Larkhill", "Stanway", "Yarrow")
FIRST = ("Miriam", "Owen", "Priya", "Tobias", "Helena", "Rashid", "Agnes", "Callum")
LAST = ("Okafor", "Lindqvist", "Marchetti", "Haverford", "Quayle", "Brightwater", "Szabo", "Nakamura")
THINGS = ("visitor centre", "Ashcombe footpath", "Kettle Lane car park", "Millbrook education room")
MONTHS = ("January", "February", "April", "June", "September", "November")
ITEMS = ("spare chlorine pumps", "emergency bottled water", "old valve keys", "flood barriers")
TOWNS = ("Wexcombe", "Danbury Cross", "Hollin Ford", "Marlow Heath", "Pennock", "Saltmarsh")


@dataclass
class Fact:
    kind: str          # code, name, date or place
    sentence: str      # the needle, inserted into the document
    question: str
    key: str           # what a right answer contains (case-insensitive)


def make_fact(rng: random.Random) -> Fact:
    """A random fact of a random kind."""
    kind = rng.choice(("code", "name", "date", "place"))
    if kind == "code":
        gate, code = rng.choice(GATES), str(rng.randint(1000, 9999))
        return Fact(kind, f"The access code for the {gate} gate is {code}.",
                    f"What is the access code for the {gate} gate?", code)
    if kind == "name":
        site, first, last = rng.choice(SITES), rng.choice(FIRST), rng.choice(LAST)
        return Fact(kind, f"The new manager of the {site} pumping station is {first} {last}.",
                    f"Who is the new manager of the {site} pumping station?", last)
    if kind == "date":
        thing, day, month = rng.choice(THINGS), rng.randint(2, 28), rng.choice(MONTHS)
        return Fact(kind, f"The {thing} will reopen on {day} {month}.", f"When will the {thing} reopen?",
                    f"{day} {month}")
    item, town = rng.choice(ITEMS), rng.choice(TOWNS)
    return Fact(kind, f"The {item} are kept in the depot at {town}.", f"Where are the {item} kept?", town)


def paragraphs():
    from importlib.resources import files

    text = (files("attnlrp_fast") / "data" / "sample_document.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _sentences(paragraph):
    """The paragraph's sentences (split after ". "), each with its trailing text, so that they join back to it."""
    import re

    return [m for m in re.split(r"(?<=\.) ", paragraph) if m]


def haystack(tokenizer, tokens):
    """Paragraphs of the sample report, repeated from the start when needed, filling at most `tokens` tokens: whole
    paragraphs, then the next one's first sentences while they fit (so the text ends within a sentence of the
    budget)."""
    def size(text):
        return len(tokenizer(text + "\n\n", add_special_tokens=False).input_ids)

    source, out, used, i = paragraphs(), [], 0, 0
    while True:
        p = source[i % len(source)]
        n = size(p)
        if used + n > tokens:
            break
        out.append(p)
        used += n
        i += 1
    part = []
    for sentence in _sentences(p):
        if used + size(" ".join(part + [sentence])) > tokens:
            break
        part.append(sentence)
    if part:
        out.append(" ".join(part))
    if not out:
        raise ValueError(f"{tokens} tokens hold no sentence of the document")
    return out


@dataclass
class Sample:
    fact: Fact
    document: str
    needle_start: int      # character span of the needle sentence in `document`
    needle_end: int


def make_sample(tokenizer, length, rng) -> Sample:
    """A document of at most `length` - HEADROOM tokens with a fact inserted at a random paragraph boundary."""
    fact = make_fact(rng)
    budget = length - HEADROOM - len(tokenizer(fact.sentence + "\n\n", add_special_tokens=False).input_ids)
    parts = haystack(tokenizer, budget)
    at = rng.randint(0, len(parts))
    document = "\n\n".join(parts[:at] + [fact.sentence] + parts[at:])
    start = document.index(fact.sentence) if at == 0 else document.index("\n\n" + fact.sentence) + 2
    return Sample(fact, document, start, start + len(fact.sentence))


def evidence_mask(prompt, sample):
    """bool (N,) over the prompt: the document tokens that overlap the needle sentence."""
    mask = torch.zeros(len(prompt.ids), dtype=torch.bool)
    pos = 0
    for i, piece in enumerate(prompt.pieces):
        if pos < sample.needle_end and pos + len(piece) > sample.needle_start:
            mask[prompt.doc_start + i] = True
        pos += len(piece)
    return mask


def is_right(answer_text, fact):
    return fact.key.lower() in answer_text.lower()


def _mean(rows, key):
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def _summary(rows):
    """One method's results over the samples (each an evaluate() row of one sample)."""
    out = {"samples": len(rows), "seconds": _mean(rows, "seconds"),
           "pointing_accuracy": _mean(rows, "pointing_accuracy"), "evidence_rank": _mean(rows, "evidence_rank"),
           "evidence_share": _mean(rows, "evidence_share"), "ranks": [r["ranks"][0] for r in rows]}
    if rows and "abpc" in rows[0]:
        out.update(abpc=_mean(rows, "abpc"), abpc_per_row=[r["abpc"] for r in rows],
                   morf=[sum(c) / len(rows) for c in zip(*(r["morf"] for r in rows))],
                   lerf=[sum(c) / len(rows) for c in zip(*(r["lerf"] for r in rows))], fractions=rows[0]["fractions"])
        for key in ("rise", "mas", "rise_ap"):
            if key in rows[0]:
                out[key] = _mean(rows, key)
    return out


def run(methods, *, model=None, tokenizer=None, lengths=LENGTHS, samples=4, steps=10, seed=0, curves_up_to=None,
        ig_steps=32, perturb="zero", backend=None, progress=None, on_length=None, model_name="smollm2", options=None):
    """The needle task at each length: {"needle-<k>k": {"task", "length", "model", "samples" (kept),
    "sampled", "model_accuracy", "wrong": [their facts and answers], "methods": {method: summary}}}.
    model / tokenizer: default SmolLM2 (af.load_model). curves_up_to: the longest length with perturbation curves
    and deletion metrics (None: every length). progress(length, method) after each method of each sample;
    on_length(name, result) as each length ends. options: the paper baselines' settings (evaluate.attribute's), a
    dict or a function of the length that returns one (each length's are in its result as "method_options")."""
    from attnlrp_fast import prompts      # the prompt and the greedy answer, as `explain` makes them
    from attnlrp_fast.loading import load_model

    if model is None:
        model, tokenizer = load_model(model_name)
    device = next(model.parameters()).device
    out = {}
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        curves = curves_up_to is None or length <= curves_up_to
        opts = Options.of(options(length) if callable(options) else options)
        per_method, wrong, sizes, t0 = {m: [] for m in methods}, [], [], time.perf_counter()
        for _ in range(samples):
            s = make_sample(tokenizer, length, rng)
            prompt = prompts.build_prompt(tokenizer, s.document, s.fact.question)
            sizes.append(prompt.doc_end - prompt.doc_start)
            answer = prompts.generate_answer(model, tokenizer, prompt.ids, MAX_ANSWER, backend=backend)
            text = tokenizer.decode(answer, skip_special_tokens=True)
            if not is_right(text, s.fact):
                wrong.append({"kind": s.fact.kind, "fact": s.fact.sentence, "answer": text})
                continue
            ids = torch.tensor([prompt.ids + answer], device=device)
            p = len(prompt.ids)
            target = [(p - 1 + j, int(t)) for j, t in enumerate(answer)]
            eligible = torch.zeros_like(ids, dtype=torch.bool)
            eligible[0, prompt.doc_start:prompt.doc_end] = True
            evidence = torch.cat([evidence_mask(prompt, s), torch.zeros(len(answer), dtype=torch.bool)])[None]
            results = ev.evaluate(model, ids, methods, target=target, eligible=eligible, evidence=evidence,
                                  ig_steps=ig_steps, backend=backend, curves=curves, checkpoint=True, options=opts,
                                  progress=progress and (lambda m: progress(length, m)),
                                  perturbation=ev.Perturbation(steps=steps, perturb=perturb, seed=seed, batch_size=8))
            for m in methods:
                per_method[m].append(results[m])
        kept = samples - len(wrong)
        name = f"needle-{length // 1024}k" if length % 1024 == 0 else f"needle-{length}"
        out[name] = {"task": name, "length": length, "document_tokens_max": length - HEADROOM,
                     "document_tokens_mean": sum(sizes) / len(sizes),
                     "model": model_name, "target": "sum of the answer tokens' logits", "seed": seed,
                     "methods_run": list(methods), "method_options": opts.changed(), "samples": kept,
                     "sampled": samples, "model_accuracy": kept / samples, "curves": curves, "wrong": wrong,
                     "seconds": time.perf_counter() - t0,
                     "methods": {m: _summary(rows) for m, rows in per_method.items() if rows}}
        if on_length:
            on_length(name, out[name])
    return out
