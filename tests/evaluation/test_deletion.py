"""Deletion metrics of generations (RISE, MAS, RISE+AP; attnlrp_fast/evaluation/deletion.py): the definitions on
hand-computed curves, and deletion_curves / evaluate on models whose answer is known."""

import math

import pytest
import torch

from attnlrp_fast.evaluation import deletion
from attnlrp_fast.evaluation import evaluate as ev
from test_attribution_methods import Additive, _ids
from tiny_models import VOCAB, build


def test_group_sizes():
    assert deletion.group_sizes(10, 4) == [3, 3, 2, 2]
    assert deletion.group_sizes(3, 10) == [1, 1, 1]
    assert deletion.group_sizes(0, 5) == []


def test_density_left_after_each_step():
    d = deletion.density(torch.tensor([2.0, 1.0, 1.0]), [1, 1, 1])
    assert d.tolist() == pytest.approx([1.0, 0.5, 0.25, 0.0])
    # the positive part: negative tokens carry no mass (removed last, they leave d at 0)
    assert deletion.density(torch.tensor([3.0, 1.0, -1.0]), [1, 1, 1]).tolist() == pytest.approx([1, 0.25, 0, 0])
    assert deletion.density(torch.tensor([-1.0, -0.5]), [1, 1]).tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_metrics_by_hand():
    # s = [-1, -2, -5, -5]: n = [1, .75, 0, 0]; d = [1, .5, .25, 0]; a = [0, .25, .25, 0]
    m = deletion.metrics([-1.0, -2.0, -5.0, -5.0], [1.0, 0.5, 0.25, 0.0])
    assert m["normalized"] == pytest.approx([1.0, 0.75, 0.0, 0.0])
    assert m["rise"] == pytest.approx((1.75 - 0.5) / 3)
    assert m["rise_ap"] == pytest.approx((2.25 - 0.5) / 3)          # n + a = [1, 1, .25, 0]
    assert m["mas"] == pytest.approx((2.25 - 0.5) / 3)              # already spans [0, 1]
    # the response never rises again: running minimum; clipped to [0, 1] first
    m = deletion.metrics([-1.0, -3.0, -2.0, 0.0, -5.0], [1.0, 0.8, 0.6, 0.4, 0.0])
    assert m["normalized"] == pytest.approx([1.0, 0.5, 0.5, 0.5, 0.0])
    # a density that never falls: n = [1, .5, 0], a = [0, .5, 1], n + a = [1, 1, 1], constant after clipping, so
    # MAS takes the straight line from 1 to 0
    m = deletion.metrics([-1.0, -3.0, -5.0], [1.0, 1.0, 1.0])
    assert (m["rise"], m["rise_ap"], m["mas"]) == pytest.approx((0.5, 1.0, 0.5))
    # MAS rescales by min and max: n = [1, .75, 0], a = [0, .15, .6], n + a = [1, .9, .6] -> [1, .75, 0]
    m = deletion.metrics([-1.0, -1.5, -3.0], [1.0, 0.6, 0.6])
    assert m["normalized"] == pytest.approx([1.0, 0.75, 0.0])
    assert m["mas"] == pytest.approx((1.0 + 0.75 + 0.0 - 0.5) / 2)


def test_a_row_where_nothing_changes_is_degenerate():
    m = deletion.metrics([-2.0, -2.0, -2.0], [1.0, 0.5, 0.0])
    assert all(math.isnan(m[k]) for k in deletion.METRICS)
    s = deletion.summary([m, deletion.metrics([-1.0, -3.0], [1.0, 0.0])])
    assert s["degenerate"] == 1 and s["rise"] == pytest.approx(0.5) and math.isnan(s["rise_per_row"][0])


def test_the_decisive_token_first_gives_the_best_curve():
    """A classification model whose answer depends on one token: removing it first makes the log-probability drop
    at once (n = [1, 0, ...]) where the density drops too, so RISE = MAS = RISE+AP = 1 / (2k); every other order
    is worse."""
    model = Additive(only=4, seed=1)   # (a seed where the answer's log-probability falls without the token)
    ids = _ids(B=1)
    rel = torch.zeros(1, ids.shape[1])
    rel[0, 4] = 1.0
    k = 4
    row = ev.deletion_curves(model, ids, rel, steps=k)[0]
    assert row["scores"][0] > row["scores"][-1] + 1
    assert row["normalized"] == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0])
    for m in deletion.METRICS:
        assert row[m] == pytest.approx(1 / (2 * k))
    late = torch.arange(ids.shape[1], dtype=torch.float32)[None] * (torch.arange(ids.shape[1]) != 4)
    worse = ev.deletion_curves(model, ids, late, steps=k)[0]     # the decisive token last
    assert all(worse[m] > row[m] for m in deletion.METRICS)


def test_scores_are_the_generation_log_probability():
    model = build("llama")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 14), generator=g)
    generation = [(10, 5), (11, 7), (13, 9)]
    rel = torch.randn(2, 14, generator=g)
    rows = ev.deletion_curves(model, ids, rel, target=generation, eligible=torch.arange(14).expand(2, -1) < 10,
                              steps=3)
    with torch.no_grad():
        lp = model(input_ids=ids).logits.log_softmax(-1)
    for b in range(2):
        expected = sum(float(lp[b, p, t]) for p, t in generation)
        assert rows[b]["scores"][0] == pytest.approx(expected, rel=1e-5)
        assert len(rows[b]["scores"]) == 4
    # the same tokens given as tensors, and as the generation of another target
    again = ev.deletion_curves(model, ids, rel, target=[(13, 9)], eligible=torch.arange(14).expand(2, -1) < 10,
                               generation=(torch.tensor([10, 11, 13]), torch.tensor([[5, 7, 9]] * 2)), steps=3)
    assert torch.allclose(torch.tensor([r["scores"] for r in again]), torch.tensor([r["scores"] for r in rows]))


def test_evaluate_reports_the_deletion_metrics_beside_abpc():
    model = build("llama")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    out = ev.evaluate(model, ids, ["attnlrp[torch]", "random"], steps=4)
    for r in out.values():
        assert {"abpc", "rise", "mas", "rise_ap", "rise_per_row", "degenerate"} <= set(r)
        assert all(0 <= r[m] <= 1 for m in deletion.METRICS)


def test_callable_targets_have_no_deletion_metrics():
    model = build("llama")
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    out = ev.evaluate(model, ids, ["random"], target=lambda o: o.logits[:, -1, 3], steps=3)
    assert "rise" not in out["random"]
    with pytest.raises(ValueError, match="log-probability of tokens"):
        ev.deletion_curves(model, ids, torch.rand(1, 10), target=lambda o: o.logits[:, -1, 3])


def test_bad_generations_are_named():
    model = build("llama")
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="outside the sequence"):
        ev.deletion_curves(model, ids, torch.rand(1, 10), generation=[(12, 3)])
    with pytest.raises(ValueError, match="outside the model's"):
        ev.deletion_curves(model, ids, torch.rand(1, 10), generation=[(8, VOCAB + 3)])
    with pytest.raises(TypeError, match="generation must be"):
        ev.deletion_curves(model, ids, torch.rand(1, 10), generation="the answer")
