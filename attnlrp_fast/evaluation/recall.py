"""Associative recall: a ground-truth task for explanations, with a tiny Llama trained on it (no download).

A sequence is BOS, then key-value pairs (distinct keys, random values, random filler tokens between pairs), then
one or more queries "? key". The model must answer each query key with the value paired with it in the context
(training supervises every query; the answers never appear after the context).
Evaluated with a single query at the end ("... ? key" -> value), the evidence for the answer is known: the
matching pair in the context. An explanation points at the evidence when its most relevant context token is
that key or that value.

    python -m attnlrp_fast.recall train [--steps 2000] [--out DIR]   # about 5 min on 2 cores (default DIR: the
                                                                     # package's data/recall_llama)
    python -m attnlrp_fast.recall check                              # accuracy of the shipped model

The trained weights ship with the package (attnlrp_fast/data/recall_llama, 1.8 MB) so that
`attnlrp-fast evaluate --task recall` needs no training.
"""

import argparse
import time
from dataclasses import dataclass

import torch

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
    return _padded([_sequence(g, pairs, max_filler, queries) for _ in range(batch_size)])


@dataclass
class _Sequence:
    ids: list                    # BOS, the pairs with filler, the queries
    answer_positions: list       # positions whose next token is a queried value
    answers: list                # the values
    evidence: tuple              # positions of the last query's key and value in the context


def _randint(g, lo, hi):
    """A random int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _sequence(g, pairs, max_filler, queries):
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
    return _Sequence(seq, positions, answers, (last, last + 1))


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
    import transformers as tf

    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG, attn_implementation="sdpa"))


def batch_loss(model, batch):
    """Cross-entropy and accuracy (both 0-d tensors) of the model's predictions of every queried value."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    ok = batch.answer_positions >= 0
    rows = torch.arange(logits.shape[0])[:, None].expand_as(batch.answer_positions)
    picked = logits[rows[ok], batch.answer_positions[ok]]
    targets = batch.answers[ok]
    return torch.nn.functional.cross_entropy(picked, targets), (picked.argmax(-1) == targets).float().mean()


def train(steps=2000, batch_size=64, lr=1e-3, seed=0, log_every=250, progress=True, pairs=(2, 24), queries=(1, 16),
          build=None, make_batch=None, loss_fn=None):
    """Train the tiny Llama from scratch (fixed seed); returns (model, log). build(seed) makes the model,
    make_batch(batch_size, pairs=, max_filler=, queries=, generator=) a batch and loss_fn(model, batch) its (loss,
    accuracy); None: this task's build_model, sample and batch_loss (reasoning_recall passes its own)."""
    build, make_batch, loss_fn = build or build_model, make_batch or sample, loss_fn or batch_loss
    torch.manual_seed(seed)
    model = build(seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # constant rate after a short warm-up, down to a tenth over the last fifth of the steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * min(1.0, max(0.1, (steps - s) / (0.2 * steps))))
    g = torch.Generator().manual_seed(seed + 1)
    log, t0 = [], time.perf_counter()
    hi, running = pairs[0], 0.0
    for step in range(1, steps + 1):
        # curriculum: contexts of pairs[0] pairs and no filler until the lookup is learned (batch accuracy over
        # 90 %), then two pairs more (and filler) each time the accuracy is back over 90 %, up to the full range.
        # Learning the lookup is a plateau the model leaves sooner the fewer pairs there are.
        batch = make_batch(batch_size, pairs=(pairs[0], hi), max_filler=0 if hi == pairs[0] else 2, queries=queries,
                           generator=g)
        loss, acc = loss_fn(model, batch)
        running = 0.9 * running + 0.1 * float(acc)
        if running > 0.9 and hi < pairs[1]:
            hi, running = min(pairs[1], hi + 2), 0.0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log.append({"step": step, "loss": float(loss.detach()), "accuracy": float(acc), "max_pairs": hi,
                        "seconds": time.perf_counter() - t0})
            if progress:
                print(f"step {step:>5}  loss {float(loss.detach()):.4f}  accuracy {float(acc):.3f}  pairs <= {hi}  "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    return model.eval(), log


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
    return word_tokenizer(token_name, VOCAB)


def word_tokenizer(name, vocab_size):
    """A fast tokenizer with one word per token id (name(id) spells it), words split at whitespace, BOS put in
    front, a word outside the vocabulary read as <pad>."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {name(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=token_name(PAD)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{token_name(BOS)} $A",
                                                       special_tokens=[(token_name(BOS), BOS)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=token_name(BOS), eos_token=token_name(PAD),
                                      pad_token=token_name(PAD), unk_token=token_name(PAD),
                                      model_max_length=MAX_POSITIONS)


def weights_path():
    from importlib.resources import files

    return files("attnlrp_fast") / "data" / "recall_llama"


def load_trained(device="cpu"):
    """The shipped trained model (eval mode)."""
    return load_shipped(weights_path(), device, "python -m attnlrp_fast.recall train")


def load_shipped(path, device, train_command):
    """A shipped trained model from `path` (eval mode); FileNotFoundError naming `train_command` when missing."""
    import transformers as tf

    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no trained model at {path}: run {train_command}")
    return tf.LlamaForCausalLM.from_pretrained(str(path)).to(device).eval()


@dataclass
class TaskCLI:
    """What `train` / `check` need of a task: its training, its check (model -> {name: value}, stored in
    training.json), the line that reports a check, its tokenizer and its shipped folder."""
    prog: str
    doc: str
    train: object
    check: object
    describe: object
    make_tokenizer: object
    weights_path: object
    load_trained: object


def run_cli(task: TaskCLI, argv=None):
    """`python -m <task> train [--steps N] [--out DIR]` (saves the model, its tokenizer and training.json with the
    log and the check) or `check` (the shipped model's check)."""
    p = argparse.ArgumentParser(prog=task.prog, description=task.doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the tiny Llama and save it")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help=f"folder (default: the package's {task.weights_path().name})")
    sub.add_parser("check", help="the shipped model on fresh sequences")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.command == "train":
        import json
        from pathlib import Path

        model, log = task.train(args.steps, args.batch_size, args.lr, args.seed)
        result = task.check(model)
        out = Path(args.out) if args.out else Path(str(task.weights_path()))
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        task.make_tokenizer().save_pretrained(out)
        (out / "training.json").write_text(json.dumps({
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "torch": torch.__version__, "log": log, **result}, indent=1))
        print(f"{task.describe(result)}; saved to {out}")
        return 0
    print(task.describe(task.check(task.load_trained())))
    return 0


def main(argv=None):
    return run_cli(TaskCLI("python -m attnlrp_fast.recall", __doc__, train,
                           lambda model: {"accuracy_single_query": accuracy(model)},
                           lambda r: f"accuracy on 512 fresh single-query sequences: {r['accuracy_single_query']:.3f}",
                           make_tokenizer, weights_path, load_trained), argv)


if __name__ == "__main__":
    raise SystemExit(main())
