"""The AttnLRP paper's neuron-level check: switch off the k neurons a method ranks highest for the answer, and
measure how far the answer's log-probability falls. A method that finds the neurons the answer rests on makes it
fall further than the others at the same k.

Neurons: every transformer layer's MLP neurons as its down projection reads them (neurons.mlp_latents). Per prompt,
each selection ranks all of them:

  attnlrp            AttnLRP relevance of the neuron for the answer (af.explain latent=, rule "attnlrp"), summed over
                     the prompt's positions
  grad_x_activation  gradient x activation, the same sum (rule "grad": the plain gradient)
  activation         the neuron's activation, the same sum
  random             k neurons drawn at random (seeded)

and the top k (k = 1, 5, 10, 50) are set to 0 at every position (af.intervene) for one forward. The drop is
log p(answer) before minus after (the sum over the answer's tokens); its mean over the prompts is reported.

Tasks: the shipped recall model (evaluation/recall.py), the hand-built concept model (evaluation/concept.py, where
the answer rests on one planted neuron) and SmolLM2 on the needle task (evaluation/needle.py, minutes per sample on a
CPU).

    attnlrp-fast evaluate --task neurons-recall --task neurons-concept [--task neurons-needle]
"""

import random
import time

import torch

from attnlrp_fast.explanation import explain
from attnlrp_fast.neurons import intervene, mlp_latents

SELECTIONS = ("attnlrp", "grad_x_activation", "activation", "random")
KS = (1, 5, 10, 50)


def _activations(model, kwargs, latents, weights):
    """(F_total,) each neuron's activation summed over the positions `weights` (B=1, N) marks."""
    seen, hooks = {}, []
    for name in latents:
        module = model.get_submodule(name.partition(":")[0])
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0])))
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([(seen[n][0].float() * weights[0, :, None]).sum(0) for n in latents]).cpu()


def _log_probability(model, kwargs, target):
    """log p of the (position, token) targets, summed."""
    with torch.no_grad():
        logits = model(**kwargs).logits[0].float()
    pos = torch.tensor([p for p, _ in target], device=logits.device)
    tok = torch.tensor([t for _, t in target], device=logits.device)
    return float(torch.log_softmax(logits[pos], -1).gather(-1, tok[:, None]).sum())


def _edits(latents, widths, picked):
    """{latent: {neuron: 0.0}} for flat neuron indices `picked`."""
    edits, starts = {}, [0]
    for w in widths:
        starts.append(starts[-1] + w)
    for i in picked:
        layer = next(j for j in range(len(latents)) if starts[j] <= i < starts[j + 1])
        edits.setdefault(latents[layer], {})[i - starts[layer]] = 0.0
    return edits


def neuron_scores(model, input_ids, target, *, attention_mask=None, latents=None, backend=None, checkpoint=False):
    """{selection: (F_total,) score per neuron} of one prompt (input_ids (1, N)) and the latents' widths."""
    latents = latents or mlp_latents(model)
    if not latents:
        raise ValueError(f"{type(model).__name__}: no MLP down projection found in its layers")
    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    weights = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).float()
    scores = {}
    for name, rule in (("attnlrp", "attnlrp"), ("grad_x_activation", "grad")):
        e = explain(model, input_ids=input_ids, attention_mask=attention_mask, target=target, rule=rule,
                    latent=latents, backend=backend, checkpoint=checkpoint)
        scores[name] = torch.cat([e.latent[n][0].sum(0) for n in latents]).cpu()
    scores["activation"] = _activations(model, kwargs, latents, weights)
    widths = [int(e.latent[n].shape[-1]) for n in latents]
    return scores, latents, widths


def ablation(model, input_ids, target, *, attention_mask=None, latents=None, ks=KS, selections=SELECTIONS, seed=0,
             backend=None, checkpoint=False):
    """One prompt: {"logprob": before, "drop": {selection: {k: log p before - after}}, "picked": {selection: {k:
    [(latent, neuron), ...] for k <= 10}}, "seconds"}. target: a list of (position, token_id) (the answer)."""
    t0 = time.perf_counter()
    scores, latents, widths = neuron_scores(model, input_ids, target, attention_mask=attention_mask, latents=latents,
                                            backend=backend, checkpoint=checkpoint)
    total = sum(widths)
    kwargs = {"input_ids": input_ids, **({"attention_mask": attention_mask} if attention_mask is not None else {})}
    before = _log_probability(model, kwargs, target)
    rng = random.Random(seed)
    out = {"logprob": before, "drop": {}, "picked": {}, "neurons": total}
    for sel in selections:
        order = rng.sample(range(total), max(ks)) if sel == "random" else \
            scores[sel].topk(min(max(ks), total)).indices.tolist()
        out["drop"][sel], out["picked"][sel] = {}, {}
        for k in ks:
            edits = _edits(latents, widths, order[:k])
            with intervene(model, edits):
                after = _log_probability(model, kwargs, target)
            out["drop"][sel][k] = before - after
            if k <= 10:
                out["picked"][sel][k] = [(name, i) for name, ns in edits.items() for i in ns]
    out["seconds"] = time.perf_counter() - t0
    return out


def summarise(rows, ks=KS, selections=SELECTIONS):
    """Mean drop per selection and k over the prompts, and how often each selection's drop is the largest at k."""
    if not rows:
        return {"prompts": 0}
    out = {"prompts": len(rows), "mean_logprob": sum(r["logprob"] for r in rows) / len(rows),
           "neurons": rows[0]["neurons"], "drop": {}, "best_share": {}}
    for sel in selections:
        out["drop"][sel] = {k: sum(r["drop"][sel][k] for r in rows) / len(rows) for k in ks}
    for k in ks:
        wins = [max(selections, key=lambda s: r["drop"][s][k]) for r in rows]
        out["best_share"][k] = {s: wins.count(s) / len(rows) for s in selections}
    out["seconds_per_prompt"] = sum(r["seconds"] for r in rows) / len(rows)
    return out


def run_recall(n=32, seed=0, device="cpu", backend=None, ks=KS, progress=None):
    """The shipped recall model, single-query sequences the model answers right."""
    from attnlrp_fast.evaluation import recall

    model = recall.load_trained(device)
    b = recall.sample(n, pairs=(16, 24), queries=1, generator=torch.Generator().manual_seed(seed))
    rows = []
    for i in range(n):
        real = int(b.attention_mask[i].sum())
        ids = b.input_ids[i:i + 1, :real].to(device)
        pos = int(b.answer_positions[i, 0])
        target = [(pos, int(b.answers[i, 0]))]
        with torch.no_grad():
            if int(model(input_ids=ids).logits[0, pos].argmax()) != target[0][1]:
                continue
        rows.append(ablation(model, ids, target, ks=ks, seed=seed + i, backend=backend))
        if progress:
            progress()
    return {"task": "neurons-recall", "model": "recall_llama", "sampled": n, **summarise(rows, ks)}   # (answered right)


def run_concept(n=32, seed=0, device="cpu", backend=None, ks=KS, progress=None):
    """The hand-built concept model on prompts with a cold word (answer "arctic")."""
    from attnlrp_fast.evaluation import concept

    model = concept.load(device)
    ids, mask, _ = concept.prompts(n, seed=seed, cold=True)
    rows = []
    for i in range(n):
        real = int(mask[i].sum())
        rows.append(ablation(model, ids[i:i + 1, :real].to(device), [(real - 1, concept.ARCTIC)], ks=ks,
                             seed=seed + i, backend=backend))
        if progress:
            progress()
    out = summarise(rows, ks)
    planted = (f"model.layers.{concept.LAYERS - 1}.mlp.down_proj:input", concept.PLANTED)
    out["planted_first"] = {s: sum(r["picked"][s][1] == [planted] for r in rows) / len(rows) for s in SELECTIONS}
    return {"task": "neurons-concept", "model": "concept_llama", "sampled": n, **out}


def run_needle(samples=2, length=1024, seed=0, backend=None, ks=KS, progress=None, model=None, tokenizer=None):
    """SmolLM2 on the needle task at one length: the samples it answers right."""
    from attnlrp_fast import prompts
    from attnlrp_fast.evaluation import needle
    from attnlrp_fast.loading import load_model

    if model is None:
        model, tokenizer = load_model("smollm2")
    device = next(model.parameters()).device
    rng = random.Random(f"{seed}-{length}")
    rows = []
    for i in range(samples):
        s = needle.make_sample(tokenizer, length, rng)
        prompt = prompts.build_prompt(tokenizer, s.document, s.fact.question)
        answer = prompts.generate_answer(model, tokenizer, prompt.ids, needle.MAX_ANSWER, backend=backend)
        if not needle.is_right(tokenizer.decode(answer, skip_special_tokens=True), s.fact):
            continue
        ids = torch.tensor([prompt.ids + answer], device=device)
        p = len(prompt.ids)
        target = [(p - 1 + j, int(t)) for j, t in enumerate(answer)]
        rows.append(ablation(model, ids, target, ks=ks, seed=seed + i, backend=backend, checkpoint=True))
        if progress:
            progress()
    if not rows:
        return {"task": f"neurons-needle-{length // 1024}k", "model": "smollm2", "sampled": samples, "prompts": 0}
    return {"task": f"neurons-needle-{length // 1024}k", "model": "smollm2", "sampled": samples, "length": length,
            **summarise(rows, ks)}


TASKS = ("neurons", "neurons-needle")   # `attnlrp-fast evaluate --task`: recall + concept; SmolLM2's needle task


def run(tasks, *, samples=32, needle_samples=2, length=1024, seed=0, device="cpu", backend=None, progress=None,
        model=None, tokenizer=None):
    """{task name: result} for `tasks` (of TASKS)."""
    out = {}
    if "neurons" in tasks:
        out["neurons-recall"] = run_recall(samples, seed, device, backend, progress=progress)
        out["neurons-concept"] = run_concept(samples, seed, device, backend, progress=progress)
    if "neurons-needle" in tasks:
        r = run_needle(needle_samples, length, seed, backend, progress=progress, model=model, tokenizer=tokenizer)
        out[r["task"]] = r
    return out


def table(results, ks=KS):
    """A markdown table: mean log-probability drop per task, selection and k (the largest per k in bold); `results` as
    run() returns them or as read back from evaluation.json."""
    lines = ["| task | prompts | selection | " + " | ".join(f"k = {k}" for k in ks) + " |",
             "|---|---|---|" + "---|" * len(ks)]
    for name, r in results.items():
        if not r.get("prompts"):
            lines.append(f"| {name} | 0 of {r.get('sampled', 0)} answered right | - |" + " - |" * len(ks))
            continue
        drop = {sel: {int(k): v for k, v in d.items()} for sel, d in r["drop"].items()}   # JSON keys are strings
        best = {k: max(drop, key=lambda s: drop[s][k]) for k in ks}
        for sel in drop:
            cells = [(f"**{drop[sel][k]:.4g}**" if best[k] == sel else f"{drop[sel][k]:.4g}") for k in ks]
            lines.append(f"| {name} | {r['prompts']} | {sel} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
