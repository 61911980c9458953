"""What the tiny ground-truth tasks (recall, reasoning_recall) share: the tiny Llama, its training loop and
curriculum, the logits at supervised positions, the word tokenizer, the shipped-model loader and the `train|check`
command line. Each task module keeps its own data, loss, check and shipped folder."""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def build_llama(config, seed=0):
    """A fresh LlamaForCausalLM of `config` (LlamaConfig fields), SDPA attention, torch seeded with `seed` first."""
    import transformers as tf

    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**config, attn_implementation="sdpa"))


def supervised_logits(model, input_ids, attention_mask, positions, targets):
    """(logits, targets) at the supervised positions (positions >= 0; positions and targets (B, T)), flattened."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    ok = positions >= 0
    rows = torch.arange(logits.shape[0])[:, None].expand_as(positions)
    return logits[rows[ok], positions[ok]], targets[ok]


def train(build, make_batch, loss_fn, steps=2000, batch_size=64, lr=1e-3, seed=0, log_every=250, progress=True,
          pairs=(2, 24), queries=(1, 16)):
    """Train a tiny model from scratch (fixed seed); returns (model, log). build(seed) makes the model,
    make_batch(batch_size, pairs=, max_filler=, queries=, generator=) a batch, loss_fn(model, batch) its (loss,
    accuracy) as 0-d tensors."""
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


def word_tokenizer(name, vocab_size, *, pad, bos, max_length):
    """A fast tokenizer with one word per token id (name(id) spells it), words split at whitespace, BOS put in
    front, a word outside the vocabulary read as the pad token."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {name(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=name(pad)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{name(bos)} $A", special_tokens=[(name(bos), bos)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=name(bos), eos_token=name(pad),
                                      pad_token=name(pad), unk_token=name(pad), model_max_length=max_length)


def shipped_path(folder):
    """The package's data/<folder> (a Traversable)."""
    from importlib.resources import files

    return files("attnlrp_fast") / "data" / folder


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
    log and the check), `check` (the shipped model's check) or `path` (the shipped model's folder, e.g. for
    `attnlrp-fast explain --model "$(python -m <task> path)"`)."""
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
    sub.add_parser("path", help="print the folder of the shipped model and its tokenizer")
    args = p.parse_args(argv)
    if args.command == "path":
        print(task.weights_path())
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.command == "train":
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
