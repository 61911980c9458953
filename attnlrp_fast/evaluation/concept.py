"""A ground truth for neuron explanations: a tiny Llama built by hand with one MLP neuron that decides a class of
answers (no training; the weights ship in attnlrp_fast/data/concept_llama).

The task: a prompt of words ends in "?"; the answer is "arctic" when any cold word (ice, snow, frost, ...) is among
the words, else "desert". The model computes it in a way that is known exactly:

  layer 0, attention   queries and keys are zero, so every position averages the values of the positions up to it;
                       one value dimension reads the cold-word marker of each token's embedding, and the output
                       writes that average into a residual dimension of its own (COLD_SIGNAL)
  layer 1, MLP         neuron PLANTED (gate: COLD_SIGNAL minus a threshold, up: the constant dimension) fires when
                       that average is above zero, and its down-projection column writes the ARCTIC dimension
  unembedding          "arctic" reads the ARCTIC dimension; "desert" reads the "?" token's own marker

Every other weight is small random noise (every other neuron fires a little and moves the logits a little), so the
planted neuron is the one neuron that decides: switching it off turns "arctic" into "desert", switching it on in a
prompt without a cold word produces "arctic", and AttnLRP's most relevant neuron for "arctic" should be it.

    python -m attnlrp_fast.evaluation.concept build [--out DIR]   # writes the model (seconds)
    python -m attnlrp_fast.evaluation.concept check               # accuracy and the planted neuron's effect
"""

import argparse
import json
from pathlib import Path

import torch

from attnlrp_fast.evaluation import tiny_task

PAD, BOS, QUERY, ARCTIC, DESERT = 0, 1, 2, 3, 4
COLD = ("ice", "snow", "frost", "glacier", "polar", "blizzard", "frozen", "sleet")
FILLER = ("the", "a", "town", "road", "river", "market", "bread", "house", "tree", "cat", "dog", "stone", "paper",
          "lamp", "chair", "window", "garden", "music", "train", "coin", "hill", "cloud", "wind", "boat", "field",
          "song", "letter", "clock", "bridge", "horse", "apple", "table")
WORDS = ("<pad>", "<bos>", "?", "arctic", "desert") + COLD + FILLER
COLD0 = 5
FILLER0 = COLD0 + len(COLD)
VOCAB = len(WORDS)
HIDDEN, INTER, LAYERS = 64, 128, 2
PLANTED = 77                          # the concept neuron: model.layers.1.mlp.down_proj:input[77]
LATENT = "model.layers.1.mlp.down_proj:input"
# residual dimensions with a meaning (the rest carry random token features)
CONST, COLD_MARK, QUERY_MARK, COLD_SIGNAL, ARCTIC_DIM = 0, 1, 2, 3, 4
FEATURES0 = 8
MAX_POSITIONS = 64
CONFIG = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD,
              bos_token_id=BOS, eos_token_id=PAD, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6)
PROG = "python -m attnlrp_fast.evaluation.concept"


def build_model(seed=0, noise=0.02):
    """The hand-built model (float32, eval mode)."""
    model = tiny_task.build_llama(CONFIG, seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(noise * torch.randn(p.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, FEATURES0:] = 0.3 * torch.randn(VOCAB, HIDDEN - FEATURES0, generator=g)
        emb[:, CONST] = 4.0
        emb[COLD0:FILLER0, COLD_MARK] = 1.0
        emb[QUERY, QUERY_MARK] = 1.0
        # layer 0: uniform causal attention; head 0 carries the cold marker into COLD_SIGNAL
        a0 = model.model.layers[0].self_attn
        for w in (a0.q_proj.weight, a0.k_proj.weight):
            w.zero_()
        a0.v_proj.weight[:, :FEATURES0] = 0.0
        a0.v_proj.weight[0] = 0.0
        a0.v_proj.weight[0, COLD_MARK] = 4.0
        a0.o_proj.weight[:FEATURES0] = 0.0
        a0.o_proj.weight[:, 0] = 0.0
        a0.o_proj.weight[COLD_SIGNAL, 0] = 2.0
        # nothing else writes the markers or the cold signal; every other neuron and head writes a little noise into
        # the ARCTIC dimension (so each has a small share of the answer's logit)
        kept = [CONST, COLD_MARK, QUERY_MARK, COLD_SIGNAL]
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[kept] = 0.0
        model.model.layers[1].self_attn.o_proj.weight[kept] = 0.0
        # layer 1, the planted neuron
        m1 = model.model.layers[1].mlp
        m1.gate_proj.weight[PLANTED] = 0.0
        m1.gate_proj.weight[PLANTED, COLD_SIGNAL] = 4.0
        m1.gate_proj.weight[PLANTED, CONST] = -0.3
        m1.up_proj.weight[PLANTED] = 0.0
        m1.up_proj.weight[PLANTED, CONST] = 0.15
        m1.down_proj.weight[:, PLANTED] = 0.0
        m1.down_proj.weight[ARCTIC_DIM, PLANTED] = 3.0
        # the answers' logits
        head = model.lm_head.weight
        head[:, :FEATURES0] = 0.0
        head[ARCTIC] = 0.0
        head[ARCTIC, ARCTIC_DIM] = 1.0
        head[DESERT] = 0.0
        head[DESERT, QUERY_MARK] = 2.0
    return model


def token_name(t):
    return WORDS[int(t)]


def make_tokenizer():
    return tiny_task.word_tokenizer(token_name, VOCAB, pad=PAD, bos=BOS, max_length=MAX_POSITIONS)


def prompts(n, seed=0, cold=True, length=(6, 14)):
    """n prompts "w1 ... wk ?" as (input_ids (n, N) right-padded, attention_mask, the cold words' positions (n, N)
    bool); with cold=True each holds 1 to 3 cold words at random places, else none."""
    g = torch.Generator().manual_seed(seed)
    rows, marks = [], []
    for _ in range(n):
        k = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
        words = (FILLER0 + torch.randint(0, len(FILLER), (k,), generator=g)).tolist()
        mark = [False] * k
        if cold:
            c = int(torch.randint(1, 4, (1,), generator=g))
            for p in torch.randperm(k, generator=g)[:c].tolist():
                words[p] = COLD0 + int(torch.randint(0, len(COLD), (1,), generator=g))
                mark[p] = True
        rows.append([BOS] + words + [QUERY])
        marks.append([False] + mark + [False])
    N = max(len(r) for r in rows)
    ids = torch.full((n, N), PAD, dtype=torch.long)
    mask = torch.zeros(n, N, dtype=torch.long)
    where = torch.zeros(n, N, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, marks)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        where[i, :len(m)] = torch.tensor(m)
    return ids, mask, where


def answers(model, ids, mask):
    """The greedy answer at each row's last real position."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits[torch.arange(ids.shape[0]), mask.sum(1) - 1].argmax(-1)


def check(model, n=256, seed=123):
    """Accuracy on prompts with and without cold words, and the answers with the planted neuron switched off (on
    cold prompts) and set to 5 at the last position (on the others)."""
    from attnlrp_fast.neurons import intervene, set_to

    cold_ids, cold_mask, _ = prompts(n, seed, cold=True)
    warm_ids, warm_mask, _ = prompts(n, seed + 1, cold=False)
    out = {"cold_accuracy": float((answers(model, cold_ids, cold_mask) == ARCTIC).float().mean()),
           "warm_accuracy": float((answers(model, warm_ids, warm_mask) == DESERT).float().mean())}
    with intervene(model, {LATENT: {PLANTED: 0.0}}):
        out["off_gives_desert"] = float((answers(model, cold_ids, cold_mask) == DESERT).float().mean())
    hits = []
    for i in range(n):   # at each prompt's own last position
        last = int(warm_mask[i].sum()) - 1
        with intervene(model, {LATENT: {PLANTED: set_to(5.0, positions=[last])}}):
            hits.append(int(answers(model, warm_ids[i:i + 1, :last + 1], warm_mask[i:i + 1, :last + 1])) == ARCTIC)
    out["on_gives_arctic"] = sum(hits) / n
    return out


def weights_path():
    return tiny_task.shipped_path("concept_llama")


def load(device="cpu"):
    """The shipped model (eval mode)."""
    return tiny_task.load_shipped(weights_path(), device, f"{PROG} build")


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the model by hand and save it")
    b.add_argument("--out", default=None, help="folder (default: the package's data/concept_llama)")
    sub.add_parser("check", help="the shipped model's accuracy and its planted neuron's effect")
    sub.add_parser("path", help="print the shipped model's folder")
    args = p.parse_args(argv)
    if args.command == "path":
        print(weights_path())
        return 0
    if args.command == "build":
        model = build_model()
        out = Path(args.out) if args.out else Path(str(weights_path()))
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        make_tokenizer().save_pretrained(out)
        result = check(model)
        (out / "concept.json").write_text(json.dumps({"planted": {"latent": LATENT, "neuron": PLANTED},
                                                      "torch": torch.__version__, **result}, indent=1))
        print(f"{result}; saved to {out}")
        return 0
    print(check(load()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
