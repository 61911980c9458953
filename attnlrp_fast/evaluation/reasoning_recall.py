"""Associative recall with reasoning: the recall task (recall.py) where the model answers the final query through an
intermediate token that carries the evidence, with a tiny Llama trained on it (no download).

A sequence is recall's (BOS, key-value pairs with filler, plain queries "? key" left unanswered), except that the
final query is answered: "? k <think> v </think> a_v", then PAD (eos). v is the value paired with k in the context
(the reasoning), a_v its answer token (ANSWER0 + v - VALUE0). Training supervises each plain query's value at its
key (as recall), and v at <think>, </think> at v, a_v at </think>, PAD at a_v.
The prompt is everything up to and including <think>. The evidence for v is the matching pair in the context; the
answer a_v is read off the reasoning token v (replacing v by another value v' makes the model answer a_v').

    python -m attnlrp_fast.evaluation.reasoning_recall train [--steps 2000] [--out DIR]
        # default DIR: the package's data/recall_reasoning_llama
    python -m attnlrp_fast.evaluation.reasoning_recall check   # accuracies and dependence of the shipped model
    python -m attnlrp_fast.evaluation.reasoning_recall path    # the shipped model's folder (for --model)

The trained weights ship with the package (attnlrp_fast/data/recall_reasoning_llama, 1.8 MB).
"""

from dataclasses import dataclass

import torch

from attnlrp_fast.evaluation import recall, tiny_task
from attnlrp_fast.evaluation.recall import BOS, MAX_POSITIONS, N_VALUES, PAD, VALUE0

THINK = recall.VOCAB
END_THINK = THINK + 1
ANSWER0 = END_THINK + 1
VOCAB_R = ANSWER0 + N_VALUES
CONFIG = dict(recall.CONFIG, vocab_size=VOCAB_R, eos_token_id=PAD)
PROG = "python -m attnlrp_fast.evaluation.reasoning_recall"


def answer_token(v):
    """The answer token of value v."""
    return ANSWER0 + (int(v) - VALUE0)


def token_name(t):
    """A readable name for a token id (reports): recall's names, <think>, </think> and a0..a39."""
    t = int(t)
    if t < recall.VOCAB:
        return recall.token_name(t)
    if t == THINK:
        return "<think>"
    if t == END_THINK:
        return "</think>"
    return f"a{t - ANSWER0}"


@dataclass
class Batch:
    input_ids: torch.Tensor         # (B, N), right-padded with PAD
    attention_mask: torch.Tensor    # (B, N), 1 up to and including the eos PAD
    target_positions: torch.Tensor  # (B, T) supervised positions (-1: none)
    targets: torch.Tensor           # (B, T) the token each of them predicts
    prompt_end: torch.Tensor        # (B,) position of <think>: the prompt is input_ids[:, :prompt_end + 1]
    reasoning: torch.Tensor         # (B, 2) the reasoning span [start, end): (position of v, position of v + 1)
    answer_position: torch.Tensor   # (B,) position of a_v
    evidence: torch.Tensor          # (B, 2) positions of the final query's key and value in the context


def sample(batch_size, *, pairs=(16, 24), max_filler=2, queries=1, reasoning=True, generator=None) -> Batch:
    """Random sequences. pairs: (min, max) number of pairs; queries: int or (min, max) queries, the last one the
    final (answered) query. reasoning=False: recall's sequences (the final query a plain one; prompt_end, reasoning
    and answer_position -1), the curriculum's first stage."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    queries = (queries, queries) if isinstance(queries, int) else queries
    return _padded([_sequence(g, pairs, max_filler, queries, reasoning) for _ in range(batch_size)])


@dataclass
class _Sequence:
    ids: list                    # recall's sequence, then <think> v </think> a_v PAD
    target_positions: list       # supervised positions
    targets: list                # the tokens they predict
    think: int                   # position of <think> (-1: none)
    evidence: tuple              # positions of the final query's key and value in the context


def _sequence(g, pairs, max_filler, queries, reasoning=True):
    r = recall.sequence(g, pairs, max_filler, queries)
    if not reasoning:
        return _Sequence(r.ids, r.answer_positions, r.answers, -1, r.evidence)
    v, think = r.answers[-1], len(r.ids)
    ids = r.ids + [THINK, v, END_THINK, answer_token(v), PAD]
    positions = r.answer_positions[:-1] + [think, think + 1, think + 2, think + 3]
    targets = r.answers[:-1] + [v, END_THINK, answer_token(v), PAD]
    return _Sequence(ids, positions, targets, think, r.evidence)


def _padded(rows):
    """A Batch of sequences, right-padded with PAD (target positions with -1)."""
    n = max(len(r.ids) for r in rows)
    t = max(len(r.targets) for r in rows)
    ids = torch.full((len(rows), n), PAD)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    positions = torch.full((len(rows), t), -1)
    targets = torch.full((len(rows), t), PAD)
    for b, r in enumerate(rows):
        ids[b, :len(r.ids)] = torch.tensor(r.ids)
        mask[b, :len(r.ids)] = 1
        positions[b, :len(r.targets)] = torch.tensor(r.target_positions)
        targets[b, :len(r.targets)] = torch.tensor(r.targets)
    think = torch.tensor([r.think for r in rows])
    none = think < 0
    reasoning = torch.stack([think + 1, think + 2], 1).masked_fill(none[:, None], -1)
    return Batch(ids, mask, positions, targets, think, reasoning, (think + 3).masked_fill(none, -1),
                 torch.tensor([r.evidence for r in rows]))


def build_model(seed=0):
    """The untrained tiny Llama (torch seeded with `seed`)."""
    return tiny_task.build_llama(CONFIG, seed)


def batch_loss(model, batch):
    """Cross-entropy of every supervised prediction and accuracy of the lookups (the supervised values: plain
    queries' and v at <think>), both 0-d tensors."""
    picked, targets = tiny_task.supervised_logits(model, batch.input_ids, batch.attention_mask, batch.target_positions,
                                                  batch.targets)
    lookup = (targets >= VALUE0) & (targets < VALUE0 + N_VALUES)
    hits = (picked.argmax(-1) == targets)[lookup]
    return torch.nn.functional.cross_entropy(picked, targets), hits.float().mean()


def _curriculum_sample(batch_size, *, pairs, max_filler, queries, generator):
    """The training batches: recall's sequences while its curriculum is at the first stage (pairs[0] pairs, no
    filler), this task's from the second on. With the reasoning from the start the model stays on the lookup's
    plateau (lookup accuracy still at chance after 2000 steps in 6 of 7 runs: seeds 0-3, lr 1e-3 and 2e-3);
    learned on plain queries first (about 500 steps), the lookup at <think> follows within about 200 steps."""
    return sample(batch_size, pairs=pairs, max_filler=max_filler, queries=queries, reasoning=max_filler > 0,
                  generator=generator)


def train(steps=2000, batch_size=64, lr=1e-3, seed=0, log_every=250, progress=True, pairs=(2, 24), queries=(1, 16)):
    """Train the tiny Llama from scratch with tiny_task's loop and curriculum (fixed seed); returns (model, log)."""
    return tiny_task.train(build_model, _curriculum_sample, batch_loss, steps, batch_size, lr, seed, log_every,
                           progress, pairs, queries)


def predictions(model, batch):
    """(B,) argmax predictions at <think> (v) and at </think> (a_v), teacher-forced."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    rows = torch.arange(logits.shape[0])
    return logits[rows, batch.prompt_end].argmax(-1), logits[rows, batch.answer_position - 1].argmax(-1)


def evaluate(model, n=512, seed=123, batch_size=128, pairs=(16, 24)):
    """On n fresh single-query sequences: value (accuracy of v at <think>), answer (accuracy of a_v at </think>),
    dependence (rate at which the model answers a_v' once v in the reasoning is replaced by another value v')."""
    g = torch.Generator().manual_seed(seed)
    value = answer = dependence = 0
    for i in range(0, n, batch_size):
        b = sample(min(batch_size, n - i), pairs=pairs, queries=1, generator=g)
        rows = torch.arange(b.input_ids.shape[0])
        v = b.input_ids[rows, b.reasoning[:, 0]]
        got_v, got_a = predictions(model, b)
        value += int((got_v == v).sum())
        answer += int((got_a == v - VALUE0 + ANSWER0).sum())
        other = (v - VALUE0 + torch.randint(1, N_VALUES, v.shape, generator=g)) % N_VALUES + VALUE0  # v' != v
        b.input_ids[rows, b.reasoning[:, 0]] = other
        _, got_other = predictions(model, b)
        dependence += int((got_other == other - VALUE0 + ANSWER0).sum())
    return {"value": value / n, "answer": answer / n, "dependence": dependence / n}


def make_tokenizer():
    """The vocabulary as a fast tokenizer: one word per token id, as token_name spells it (`<bos> k3 v17 _2 k8 v1
    ? k3 <think> v17 </think> a17`), words split at whitespace, BOS put in front; a word outside the vocabulary
    becomes <pad>."""
    return tiny_task.word_tokenizer(token_name, VOCAB_R, pad=PAD, bos=BOS, max_length=MAX_POSITIONS)


def weights_path():
    """The shipped model's folder (a Traversable)."""
    return tiny_task.shipped_path("recall_reasoning_llama")


def load_trained(device="cpu"):
    """The shipped trained model (eval mode)."""
    return tiny_task.load_shipped(weights_path(), device, f"{PROG} train")


def _check(model):
    r = evaluate(model)
    return {"accuracy_value": r["value"], "accuracy_answer": r["answer"], "dependence": r["dependence"]}


def _describe(r):
    return (f"on 512 fresh sequences (16-24 pairs): v at <think> {r['accuracy_value']:.3f}, a_v at </think> "
            f"{r['accuracy_answer']:.3f}, a_v' after v -> v' {r['dependence']:.3f}")


def main(argv=None):
    return tiny_task.run_cli(tiny_task.TaskCLI(PROG, __doc__, train, _check, _describe, make_tokenizer, weights_path,
                                               load_trained), argv)


if __name__ == "__main__":
    raise SystemExit(main())
