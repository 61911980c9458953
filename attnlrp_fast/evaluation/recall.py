"""Associative recall: a ground-truth task for explanations, with a tiny Llama trained on it (no download).

A sequence is BOS, then key-value pairs (distinct keys, random values, random filler tokens between pairs), then
one or more queries "? key". The model must answer each query key with the value paired with it in the context
(training supervises every query; the answers never appear after the context).
Evaluated with a single query at the end ("... ? key" -> value), the evidence for the answer is known: the
matching pair in the context. An explanation points at the evidence when its most relevant context token is
that key or that value.

    python -m attnlrp_fast.evaluation.recall train [--steps 2000] [--out DIR]
        # about 5 min on 2 cores (default DIR: the package's data/recall_llama)
    python -m attnlrp_fast.evaluation.recall check   # accuracy of the shipped model
    python -m attnlrp_fast.evaluation.recall path    # the shipped model's folder (for --model)

The trained weights ship with the package (attnlrp_fast/data/recall_llama, 1.8 MB) so that
`attnlrp-fast evaluate --task recall` needs no training. The training loop, tokenizer, loader and command line are
tiny_task's.
"""

from dataclasses import dataclass

import torch

from attnlrp_fast.evaluation import tiny_task

PAD, BOS, QUERY = 0, 1, 2
N_KEYS, N_VALUES, N_FILLER = 40, 40, 20
KEY0 = 3
VALUE0 = KEY0 + N_KEYS
FILLER0 = VALUE0 + N_VALUES
VOCAB = FILLER0 + N_FILLER
MAX_POSITIONS = 256
CONFIG = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD, bos_token_id=BOS,
              eos_token_id=PAD, tie_word_embeddings=False, rope_theta=10000.0)
PROG = "python -m attnlrp_fast.evaluation.recall"


def token_name(t):
    """A readable name for a token id (reports)."""
    t = int(t)
    if t == PAD:
        return "<pad>"
    if t == BOS:
        return "<bos>"
    if t == QUERY:
        return "?"
    if KEY0 <= t < VALUE0:
        return f"k{t - KEY0}"
    if VALUE0 <= t < FILLER0:
        return f"v{t - VALUE0}"
    return f"_{t - FILLER0}"


@dataclass
class Batch:
    input_ids: torch.Tensor      # (B, N), right-padded with PAD
    attention_mask: torch.Tensor  # (B, N)
    answer_positions: torch.Tensor  # (B, Q) positions whose next token is a queried value (-1: none)
    answers: torch.Tensor        # (B, Q) the values
    evidence: torch.Tensor       # (B, 2) positions of the last query's key and value in the context


def sample(batch_size, *, pairs=(12, 24), max_filler=2, queries=1, generator=None) -> Batch:
    """Random sequences. pairs: (min, max) number of pairs; queries: int or (min, max) queries at the end.
    Every sequence ends with a query key, so its last position predicts the last query's value."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    queries = (queries, queries) if isinstance(queries, int) else queries
    return _padded([sequence(g, pairs, max_filler, queries) for _ in range(batch_size)])


@dataclass
class Sequence:
    """One sequence of sample's (before padding)."""
    ids: list                    # BOS, the pairs with filler, the queries
    answer_positions: list       # positions whose next token is a queried value
    answers: list                # the values
    evidence: tuple              # positions of the last query's key and value in the context


def _randint(g, lo, hi):
    """A random int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def sequence(g, pairs, max_filler, queries):
    """One random sequence from generator g (sample's arguments; queries a (min, max) pair)."""
    p = _randint(g, *pairs)
    keys = (torch.randperm(N_KEYS, generator=g)[:p] + KEY0).tolist()
    values = (torch.randint(0, N_VALUES, (p,), generator=g) + VALUE0).tolist()
    seq, where = [BOS], {}
    for k, v in zip(keys, values):
        where[k] = len(seq)
        seq += [k, v]
        seq += (torch.randint(0, N_FILLER, (_randint(g, 0, max_filler),), generator=g) + FILLER0).tolist()
    n_q = min(_randint(g, *queries), p)
    asked = torch.randperm(p, generator=g)[:n_q].tolist()
    positions, answers = [], []
    for i in asked:
        seq += [QUERY, keys[i]]
        positions.append(len(seq) - 1)
        answers.append(values[i])
        # queries are not answered in the sequence: answers there would let a model score by elimination
        # (a context value not yet used), a local minimum that keeps it from learning the lookup
    last = where[keys[asked[-1]]]
    return Sequence(seq, positions, answers, (last, last + 1))


def _padded(rows):
    """A Batch of sequences, right-padded with PAD (answer positions with -1)."""
    n = max(len(r.ids) for r in rows)
    q = max(len(r.answers) for r in rows)
    ids = torch.full((len(rows), n), PAD)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    positions = torch.full((len(rows), q), -1)
    answers = torch.full((len(rows), q), PAD)
    for b, r in enumerate(rows):
        ids[b, :len(r.ids)] = torch.tensor(r.ids)
        mask[b, :len(r.ids)] = 1
        positions[b, :len(r.answers)] = torch.tensor(r.answer_positions)
        answers[b, :len(r.answers)] = torch.tensor(r.answers)
    return Batch(ids, mask, positions, answers, torch.tensor([r.evidence for r in rows]))


def build_model(seed=0):
    """The untrained tiny Llama (torch seeded with `seed`)."""
    return tiny_task.build_llama(CONFIG, seed)


def batch_loss(model, batch):
    """Cross-entropy and accuracy (both 0-d tensors) of the model's predictions of every queried value."""
    picked, targets = tiny_task.supervised_logits(model, batch.input_ids, batch.attention_mask, batch.answer_positions,
                                                  batch.answers)
    return torch.nn.functional.cross_entropy(picked, targets), (picked.argmax(-1) == targets).float().mean()


def train(steps=2000, batch_size=64, lr=1e-3, seed=0, log_every=250, progress=True, pairs=(2, 24), queries=(1, 16)):
    """Train the tiny Llama from scratch with tiny_task's loop and curriculum (fixed seed); returns (model, log)."""
    return tiny_task.train(build_model, sample, batch_loss, steps, batch_size, lr, seed, log_every, progress, pairs,
                           queries)


def accuracy(model, n=512, seed=123, batch_size=128):
    """Accuracy on fresh single-query sequences (the evaluation setting)."""
    g = torch.Generator().manual_seed(seed)
    hits = 0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            b = sample(min(batch_size, n - i), queries=1, generator=g)
            _, acc = batch_loss(model, b)
            hits += float(acc) * b.input_ids.shape[0]
    return hits / n


def make_tokenizer():
    """The recall vocabulary as a fast tokenizer: one word per token id, as token_name spells it (`<bos> k3 v17 _2
    k8 v1 ? k3`), words split at whitespace, BOS put in front. A word outside the vocabulary becomes <pad>, whose
    input embedding carries nothing. Saved with the shipped model, so that `attnlrp-fast explain --model
    <package>/data/recall_llama --no-chat` reads a document of such words."""
    return tiny_task.word_tokenizer(token_name, VOCAB, pad=PAD, bos=BOS, max_length=MAX_POSITIONS)


def weights_path():
    """The shipped model's folder (a Traversable)."""
    return tiny_task.shipped_path("recall_llama")


def load_trained(device="cpu"):
    """The shipped trained model (eval mode)."""
    return tiny_task.load_shipped(weights_path(), device, f"{PROG} train")


def main(argv=None):
    return tiny_task.run_cli(tiny_task.TaskCLI(
        PROG, __doc__, train, lambda model: {"accuracy_single_query": accuracy(model)},
        lambda r: f"accuracy on 512 fresh single-query sequences: {r['accuracy_single_query']:.3f}",
        make_tokenizer, weights_path, load_trained), argv)


if __name__ == "__main__":
    raise SystemExit(main())
