"""Associative recall with reasoning: the sequences' layout, the tokenizer and the shipped tiny Llama."""

import json
from pathlib import Path

import torch

from attnlrp_fast.evaluation import reasoning_recall as rr
from attnlrp_fast.evaluation import recall


def test_sequences_hold_the_reasoning_and_its_evidence():
    b = rr.sample(16, pairs=(5, 9), queries=(1, 4), generator=torch.Generator().manual_seed(3))
    for row in range(16):
        ids = b.input_ids[row].tolist()
        n = int(b.attention_mask[row].sum())
        think, (start, end), answer = int(b.prompt_end[row]), b.reasoning[row].tolist(), int(b.answer_position[row])
        key, v = ids[think - 1], ids[start]
        assert ids[0] == recall.BOS and all(t == recall.PAD for t in ids[n - 1:])   # eos PAD, then padding
        assert ids[think - 2] == recall.QUERY and recall.KEY0 <= key < recall.VALUE0 and ids[think] == rr.THINK
        assert (start, end) == (think + 1, think + 2) and recall.VALUE0 <= v < recall.FILLER0
        assert ids[end] == rr.END_THINK and answer == end + 1 == n - 2
        assert ids[answer] == rr.answer_token(v) == rr.ANSWER0 + v - recall.VALUE0
        k, kv = b.evidence[row].tolist()
        first_query = ids.index(recall.QUERY)
        assert kv == k + 1 < first_query and ids[k] == key and ids[kv] == v
        assert ids[1:first_query].count(key) == 1                                  # the pair, once, in the context
        supervised = [(p, t) for p, t in zip(b.target_positions[row].tolist(), b.targets[row].tolist()) if p >= 0]
        assert supervised[-4:] == [(think, v), (start, rr.END_THINK), (end, rr.answer_token(v)), (answer, recall.PAD)]
        for p, t in supervised[:-4]:                                              # plain queries, unanswered
            assert ids[p - 1] == recall.QUERY and ids[p + 1] == recall.QUERY
            assert ids[ids.index(ids[p]) + 1] == t
    same = recall.sample(16, pairs=(5, 9), queries=(1, 4), generator=torch.Generator().manual_seed(3))
    for row in range(16):                                                       # recall's sequence, then the reasoning
        n = int(same.attention_mask[row].sum())
        assert int(b.prompt_end[row]) == n and torch.equal(b.input_ids[row, :n], same.input_ids[row, :n])
    plain = rr.sample(16, pairs=(5, 9), queries=(1, 4), reasoning=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.input_ids, same.input_ids) and torch.equal(plain.targets, same.answers)
    assert torch.equal(plain.target_positions, same.answer_positions) and torch.equal(plain.evidence, same.evidence)
    assert (plain.prompt_end == -1).all() and (plain.reasoning == -1).all() and (plain.answer_position == -1).all()
    default = rr.sample(32, generator=torch.Generator().manual_seed(4))
    for row in default.input_ids.tolist():
        context = row[1:row.index(recall.QUERY)]
        assert 16 <= sum(recall.KEY0 <= t < recall.VALUE0 for t in context) <= 24
        assert row.count(recall.QUERY) == 1                                        # one query: the final one


def test_token_names_and_the_tokenizer_round_trip():
    assert rr.VOCAB_R == recall.VOCAB + 2 + recall.N_VALUES == 145
    assert [rr.token_name(t) for t in (rr.THINK, rr.END_THINK, rr.ANSWER0, rr.VOCAB_R - 1)] == \
        ["<think>", "</think>", "a0", "a39"]
    assert all(rr.token_name(t) == recall.token_name(t) for t in range(recall.VOCAB))
    tok = rr.make_tokenizer()
    assert len(tok) == rr.VOCAB_R and len({rr.token_name(t) for t in range(rr.VOCAB_R)}) == rr.VOCAB_R
    b = rr.sample(4, generator=torch.Generator().manual_seed(5))
    for row in range(4):
        ids = b.input_ids[row, :int(b.attention_mask[row].sum())].tolist()
        words = [rr.token_name(t) for t in ids]
        assert tok(" ".join(words[1:])).input_ids == ids                            # BOS put in front
        assert tok.convert_ids_to_tokens(ids) == words


def test_the_shipped_model_reasons_and_answers():
    model = rr.load_trained()
    assert model.config.vocab_size == rr.VOCAB_R and model.config.eos_token_id == recall.PAD
    result = rr.evaluate(model, n=64, seed=11)
    assert result["value"] > 0.9 and result["answer"] > 0.9
    path = Path(str(rr.weights_path()))
    info = json.loads((path / "training.json").read_text())
    assert info["accuracy_value"] > 0.95 and info["accuracy_answer"] > 0.95
    assert sum(f.stat().st_size for f in path.iterdir()) < 3 * 2 ** 20


def test_the_reasoning_task_one_hop_lands_on_the_reasoning_token_the_hops_on_the_evidence():
    """The claim the task is for: one hop of AttnLRP puts the most relevance on the reasoning token v, the hop
    methods follow it back to the context pair (k, v) that v came from."""
    from attnlrp_fast.evaluation import faithfulness

    out = faithfulness.run_reasoning(["attnlrp", "random"], n=8, steps=4)
    assert out["samples"] == 8 and out["hop0_top_is_reasoning_token"] >= 0.9
    methods = out["methods"]
    assert set(methods) == {"attnlrp", "random", "attnlrp_hops_positive", "attnlrp_hops_signed"}
    for m in ("attnlrp_hops_positive", "attnlrp_hops_signed"):
        assert methods[m]["pointing_accuracy"] == 1.0
        assert methods[m]["evidence_rank"] <= methods["attnlrp"]["evidence_rank"]
        assert methods[m]["mas"] < methods["random"]["mas"]
    assert all({"rise", "mas", "rise_ap", "abpc"} <= set(r) for r in methods.values())


def test_explain_finds_the_think_block_of_the_shipped_model(tmp_path, capsys):
    """`attnlrp-fast explain --model <the reasoning model> --no-chat`: the model generates "v </think> a_v", auto
    finds the block opened at the prompt's end, and the hops put the most document relevance on the pair."""
    from attnlrp_fast.app import cli

    doc = tmp_path / "doc.txt"
    doc.write_text("k3 v17 _2 k8 v1 k12 v30 _5 _6 k20 v4 k5 v9 ? k8 <think>\n", encoding="utf-8")
    out = tmp_path / "r"
    rc = cli.main(["explain", "--model", str(rr.weights_path()), "--document", str(doc), "--no-chat", "--hops", "1",
                   "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads((out / "explanation.json").read_text())
    assert data["answer"].strip() == "a1" and data["reasoning"]["tokens"] == ["v1"]
    assert "auto (<think> ... </think>)" in printed
    hop1 = data["reasoning"]["document_relevance_per_hop"][1]
    assert data["tokens"][max(range(len(hop1)), key=hop1.__getitem__)].strip() in ("k8", "v1")
