"""The neuron-level check (evaluation/neuron_ablation.py): each selection's ranking, the switched-off forward against
a copy with the neurons' down-projection columns zeroed, the summary, and the concept model's planted neuron."""

import copy

import torch

from attnlrp_fast.evaluation import neuron_ablation as na
from tiny_models import build, inputs

LATENTS = ["model.layers.0.mlp.down_proj:input", "model.layers.1.mlp.down_proj:input"]


def _zeroed(model, flat, width=48):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for i in flat:
            m.model.layers[i // width].mlp.down_proj.weight[:, i % width] = 0.0
    return m


def _logprob(model, ids, target):
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(lp[p, t]) for p, t in target)


def test_ablation_switches_off_each_selections_top_k():
    model = build("llama", dtype=torch.float64)
    ids = inputs("llama", batch=1, length=12, seed=3)["input_ids"]
    with torch.no_grad():
        token = int(model(input_ids=ids).logits[0, -1].argmax())
    target = [(11, token)]
    scores, latents, widths = na.neuron_scores(model, ids, target, backend="torch")
    assert latents == LATENTS and widths == [48, 48]
    # activation: summed over the positions, by a hook of our own
    seen = []
    hooks = [model.get_submodule(n.partition(":")[0]).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
             for n in LATENTS]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert torch.allclose(scores["activation"].double(), torch.cat([s[0].sum(0) for s in seen]).float().double(),
                          atol=1e-5)
    r = na.ablation(model, ids, target, ks=(1, 3), seed=5, backend="torch")
    before = _logprob(model, ids, target)
    assert abs(r["logprob"] - before) < 1e-6
    for sel in ("attnlrp", "grad_x_activation", "activation"):
        top = scores[sel].topk(3).indices.tolist()
        for k in (1, 3):
            after = _logprob(_zeroed(model, top[:k]), ids, target)
            assert abs(r["drop"][sel][k] - (before - after)) < 1e-6, (sel, k)
            assert sorted(r["picked"][sel][k]) == sorted((LATENTS[i // 48], i % 48) for i in top[:k])
    picked = r["picked"]["random"][3]
    assert len(set(picked)) == 3 and picked == na.ablation(model, ids, target, ks=(1, 3), seed=5,
                                                           backend="torch")["picked"]["random"][3]
    s = na.summarise([r, r], ks=(1, 3))
    assert s["prompts"] == 2 and s["drop"]["attnlrp"][3] == r["drop"]["attnlrp"][3]
    assert abs(sum(s["best_share"][1].values()) - 1.0) < 1e-9


def test_the_concept_models_answer_rests_on_the_planted_neuron():
    out = na.run_concept(n=3, ks=(1, 2), backend="torch")
    assert out["planted_first"]["attnlrp"] == 1.0 and out["prompts"] == 3
    assert out["drop"]["attnlrp"][1] > 2.0 > abs(out["drop"]["random"][1])
