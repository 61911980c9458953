"""Is an explanation faithful? Input-perturbation curves, their area, pointing at known evidence, and the
baseline attribution methods to compare AttnLRP with, all through one interface.

    import attnlrp_fast as af
    from attnlrp_fast import evaluate as ev

    r = ev.attribute(model, ids, "attnlrp")                  # or "cp", "grad_x_input", "integrated_gradients",
                                                              # "attention", "random"; "attnlrp[triton]" picks a backend
    c = ev.perturbation_curves(model, ids, r.relevance, target=r.target, steps=10)
    c.abpc                                                    # (B,) area between the curves: higher is better
    table = ev.evaluate(model, ids, methods=ev.METHODS)       # every method, the same perturbations

Perturbation (as in the AttnLRP paper): remove the input tokens in steps of a fraction of the eligible tokens,
most relevant first (MoRF) and least relevant first (LeRF), and record the target score (the logit an
explanation explains) each time. A token is removed by zeroing its input embedding (the vector relevance is
defined on; default) or by replacing its id with a pad / mask token (perturb="token"). A faithful explanation
makes the score fall fast under MoRF and slowly under LeRF: ABPC = area(LeRF) - area(MoRF), with the fraction
removed on the x axis from 0 to 1 (trapezoids), so it is in the score's unit (a logit). Ties in the relevance
are broken at random (seeded), so a constant relevance scores like a random one. All variants of one input run
as batches of `batch_size` rows.

The target stays what it was on the unperturbed input: an argmax target is fixed to the token / class it chose.
A callable target f(outputs) -> (B,) must accept outputs whose rows are variants of one input (broadcast).
"""

import contextlib
import time
from dataclasses import dataclass, field

import torch

from attnlrp_fast.explain import (Contrast, _check_inputs, _forward_parameters, _score, _target_rows,
                                  _token_positions)
from attnlrp_fast.lrp import active_handle
from attnlrp_fast.reference import visibility

METHODS = ("attnlrp", "cp", "grad_x_input", "integrated_gradients", "attention", "random")
_RULES = {"attnlrp": "attnlrp", "cp": "cp", "grad_x_input": "grad"}
PERTURB = ("zero", "token")


@dataclass
class Attribution:
    relevance: torch.Tensor        # (B, N) float32
    method: str
    target: object                 # the target with argmax choices fixed: reuse it for perturbation_curves
    score: torch.Tensor            # (B,) the target score on the input
    seconds: float = 0.0


@dataclass
class Curves:
    fractions: list                # x: fraction of the eligible tokens removed, 0 .. 1
    morf: torch.Tensor             # (B, S + 1) target score, most relevant removed first
    lerf: torch.Tensor             # (B, S + 1) least relevant first
    abpc: torch.Tensor             # (B,) area(LeRF) - area(MoRF)
    eligible: torch.Tensor         # (B,) number of tokens that could be removed
    extra: dict = field(default_factory=dict)


def parse_method(method):
    """'attnlrp[triton]' -> ('attnlrp', 'triton'); 'cp' -> ('cp', None)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    name, _, rest = method.partition("[")
    backend = rest[:-1] if rest.endswith("]") else (None if not rest else rest)
    if name not in METHODS or (rest and not rest.endswith("]")):
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)} (attnlrp, cp and "
                         "grad_x_input also as name[torch] / name[triton])")
    if backend is not None and (name not in _RULES or backend not in ("torch", "triton")):
        raise ValueError(f"method {method!r}: a backend in brackets goes with {', '.join(_RULES)} and is 'torch' or "
                         "'triton'")
    return name, backend


def _as_batch(model, input_ids, attention_mask):
    """(B, N) ids and mask, checked as af.explain checks them (types, shapes, devices, vocabulary)."""
    return _check_inputs(model, input_ids, attention_mask, None)


def _forward(model, input_ids, attention_mask, target, position, keep=None):
    """Target score (B,) without gradients; keep: (B, N) float multiplier on the input embeddings."""
    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    params = _forward_parameters(model)
    if "use_cache" in params:
        kwargs["use_cache"] = False
    positions = kept = None
    if not callable(target) and "logits_to_keep" in params:
        positions = _token_positions(target, input_ids, attention_mask, position)
        kept = torch.unique(positions)
        kwargs["logits_to_keep"] = kept
    handle = None
    if keep is not None:
        def hook(module, inputs, output):
            return output * keep[..., None].to(output.dtype)
        handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        with torch.no_grad():
            outputs = model(**kwargs)
            if callable(target) and not isinstance(target, Contrast):
                return target(outputs).reshape(-1).float(), None
            logits = outputs.logits
            if positions is None and logits.dim() == 3:
                positions = _token_positions(target, input_ids, attention_mask, position)
            score, ids, _ = _score(target, logits, positions, kept)
            return score.float(), ids
    finally:
        if handle is not None:
            handle.remove()


def _chooses_argmax(target):
    """Whether the target picks its token / class on the input (None: argmax; an int or 0-d tensor: a position)."""
    return target is None or isinstance(target, int) or (isinstance(target, torch.Tensor) and target.dim() == 0)


def fix_target(model, input_ids, attention_mask=None, target=None, position=None):
    """The target with an argmax choice fixed to what the model chose on this input, and its score (B,)."""
    input_ids, attention_mask = _as_batch(model, input_ids, attention_mask)
    score, ids = _forward(model, input_ids, attention_mask, target, position)
    if _chooses_argmax(target):
        target = ids.reshape(ids.shape[0], -1)[:, 0].clone()
    return target, score


def _repeat_target(target, times):
    """The target for a batch whose rows are each input row repeated `times` times (row-major)."""
    if isinstance(target, torch.Tensor) and target.dim() == 1:
        return target.repeat_interleave(times)
    return target


# --- attribution methods --------------------------------------------------------------------------------------
def attribute(model, input_ids, method="attnlrp", *, attention_mask=None, target=None, position=None,
              backend=None, ig_steps=32, ig_batch=32, seed=0) -> Attribution:
    """Relevance (B, N) of each input token for `target` by `method` (see METHODS), on the same footing:

    attnlrp / cp / grad_x_input   af.explain with rule attnlrp / cp / grad (gradient x input on the embeddings)
    integrated_gradients          x * mean over ig_steps points a of grad f(a x) on the path from 0 to the input
                                  embeddings (midpoint rule, batched ig_batch rows at a time)
    attention                     last layer's attention weights from the target position(s), mean over heads
    random                        uniform random numbers (seeded)
    """
    import attnlrp_fast as af

    name, bracket = parse_method(method)
    backend = bracket or backend
    input_ids, attention_mask = _as_batch(model, input_ids, attention_mask)
    target, score = fix_target(model, input_ids, attention_mask, target, position)
    t = time.perf_counter()
    if name in _RULES:
        rel = af.explain(model, input_ids=input_ids, attention_mask=attention_mask, target=target, position=position,
                         rule=_RULES[name], backend=backend).relevance
    elif name == "integrated_gradients":
        rel = integrated_gradients(model, input_ids, attention_mask, target, position, steps=ig_steps,
                                   batch=ig_batch, backend=backend)
    elif name == "attention":
        rel = last_layer_attention(model, input_ids, attention_mask, target, position, backend=backend)
    else:
        g = torch.Generator().manual_seed(seed)
        rel = torch.rand(input_ids.shape, generator=g).to(input_ids.device)
    if attention_mask is not None:
        rel = rel * attention_mask.to(rel.dtype)
    return Attribution(rel.float(), method, target, score, time.perf_counter() - t)


def integrated_gradients(model, input_ids, attention_mask, target, position, steps=32, batch=32, backend=None):
    """Integrated gradients from the zero embedding, on the output of the input-embedding module (where AttnLRP's
    relevance is defined). Each of the B x steps path points is one batch row."""
    import attnlrp_fast as af

    if steps < 1:
        raise ValueError(f"ig_steps must be at least 1, got {steps}")
    B, N = input_ids.shape
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    total = torch.zeros(B, N, device=input_ids.device)
    rows_per_call = max(1, batch // B) if batch >= B else 1
    emb = model.get_input_embeddings()
    for i in range(0, steps, rows_per_call):
        a = alphas[i:i + rows_per_call].to(input_ids.device)
        s = a.numel()
        scale = a.repeat(B)                             # row b * s + j has alpha a[j]

        def hook(module, inputs, output, scale=scale):
            return output * scale.to(output.dtype)[:, None, None]
        handle = emb.register_forward_hook(hook)        # runs before explain's own hook on the same module
        try:
            e = af.explain(model, input_ids=input_ids.repeat_interleave(s, 0),
                           attention_mask=None if attention_mask is None else attention_mask.repeat_interleave(s, 0),
                           target=_repeat_target(target, s), position=position, rule="grad", backend=backend)
        finally:
            handle.remove()
        # relevance of the scaled input is (a x) * g(a x): divide by a for x * g(a x)
        total += (e.relevance.reshape(B, s, N) / a[None, :, None]).sum(1)
    return total / steps


def last_layer_attention(model, input_ids, attention_mask, target, position, backend=None):
    """Mean over heads (and over the target positions) of the last attention layer's weights from the position(s)
    whose logits the target reads; for classification heads, from the first token ([CLS]). O(N) memory: only
    those rows are formed."""
    import attnlrp_fast as af
    from attnlrp_fast.bindings.hf import CAPTURE_ATTR, attention_modules

    logits_model = "logits_to_keep" in _forward_parameters(model)
    if callable(target) and not isinstance(target, Contrast) or not logits_model:
        positions = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
        if logits_model:   # a callable on a token model: the last real position
            positions = _target_rows(input_ids, attention_mask, None, input_ids.shape[1])[:, None]
    else:
        positions = _token_positions(target, input_ids, attention_mask, position)
    captured = {}
    # the engine's attention function hands the last layer's query and key to the capture (af.lrp routes
    # attention through it; the forward is the same under every rule)
    with contextlib.nullcontext() if active_handle(model) is not None else af.lrp(model, "grad", backend=backend):
        last = attention_modules(model)[-1]
        setattr(last, CAPTURE_ATTR, lambda **kw: captured.update(kw))
        try:
            _forward(model, input_ids, attention_mask, target, position)
        finally:
            delattr(last, CAPTURE_ATTR)
    if not captured:
        raise RuntimeError(f"{type(model).__name__}: its last attention module did not run through the engine")
    q, k = captured["query"].float(), captured["key"].float()
    B, H, N, D = q.shape
    M = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], 1)
    qs = q[torch.arange(B)[:, None], :, positions].transpose(1, 2)            # (B, H, P, D)
    scale = captured["scaling"] if captured["scaling"] is not None else D ** -0.5
    s = (qs @ k.transpose(-1, -2)) * scale                                      # (B, H, P, M)
    if captured["softcap"]:
        s = captured["softcap"] * torch.tanh(s / captured["softcap"])
    keep = visibility(positions, N, M, causal=captured["causal"], window=captured["window"] or None,
                      key_padding_mask=captured["key_padding_mask"], device=s.device)   # (B, 1, P, M)
    w = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return w.mean(dim=(1, 2))


# --- perturbation ----------------------------------------------------------------------------------------------
def _order(relevance, eligible, generator):
    """Eligible positions sorted by relevance, most relevant first; ties in random (seeded) order."""
    idx = eligible.nonzero().flatten()
    perm = idx[torch.randperm(idx.numel(), generator=generator).to(idx.device)]
    vals = relevance[perm]
    order = torch.sort(vals, descending=True, stable=True).indices
    return perm[order]


def perturbation_curves(model, input_ids, relevance, *, attention_mask=None, target=None, position=None, steps=10,
                        perturb="zero", replace_id=None, eligible=None, batch_size=32, seed=0) -> Curves:
    """MoRF and LeRF curves of the target score and their ABPC for each input row.

    eligible: bool (B, N), the tokens that may be removed (default: every real token up to the last position the
              target reads, for token-logit models; every real token otherwise). Protect special tokens here.
    perturb: "zero" zeroes removed tokens' input embeddings; "token" replaces their ids with replace_id.
    """
    if perturb not in PERTURB:
        raise ValueError(f"perturb must be one of {PERTURB}, got {perturb!r}")
    if perturb == "token" and replace_id is None:
        raise ValueError("perturb='token' needs replace_id (a pad or mask token id)")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    input_ids, attention_mask = _as_batch(model, input_ids, attention_mask)
    B, N = input_ids.shape
    relevance = torch.as_tensor(relevance).to(input_ids.device).float()
    if relevance.dim() == 1:
        relevance = relevance[None]
    if tuple(relevance.shape) != (B, N):
        raise ValueError(f"relevance has shape {tuple(relevance.shape)}, the input {(B, N)}")
    if not torch.isfinite(relevance).all():
        raise ValueError("relevance holds NaN or inf")
    if _chooses_argmax(target):   # a fixed target needs no forward here (evaluate and attribute fix it already)
        target, _ = fix_target(model, input_ids, attention_mask, target, position)
    if eligible is None:
        eligible = default_eligible(model, input_ids, attention_mask, target, position)
    eligible = torch.as_tensor(eligible, device=input_ids.device).bool()
    if eligible.dim() == 1:
        eligible = eligible[None]
    if tuple(eligible.shape) != (B, N):
        raise ValueError(f"eligible has shape {tuple(eligible.shape)}, the input {(B, N)}")
    fractions = [s / steps for s in range(steps + 1)]
    g = torch.Generator().manual_seed(seed)
    morf = torch.empty(B, steps + 1)
    lerf = torch.empty(B, steps + 1)
    for b in range(B):
        order = _order(relevance[b], eligible[b], g)
        n = order.numel()
        ks = [round(f * n) for f in fractions]
        keeps = []
        for descending in (True, False):
            ranked = order if descending else order.flip(0)
            for k in ks:
                keep = torch.ones(N, device=input_ids.device)
                keep[ranked[:k]] = 0.0
                keeps.append(keep)
        keeps = torch.stack(keeps)                      # (2 (S + 1), N)
        scores = []
        ids_b = input_ids[b:b + 1]
        mask_b = None if attention_mask is None else attention_mask[b:b + 1]
        tgt_b = target[b:b + 1] if isinstance(target, torch.Tensor) and target.dim() == 1 else target
        for i in range(0, keeps.shape[0], batch_size):
            chunk = keeps[i:i + batch_size]
            v = chunk.shape[0]
            ids = ids_b.expand(v, N)
            if perturb == "token":
                ids = torch.where(chunk.bool(), ids, torch.full_like(ids, int(replace_id)))
            score, _ = _forward(model, ids, None if mask_b is None else mask_b.expand(v, N),
                                _repeat_target(tgt_b, v), position, keep=chunk if perturb == "zero" else None)
            scores.append(score.cpu())
        scores = torch.cat(scores)
        morf[b], lerf[b] = scores[:steps + 1], scores[steps + 1:]
    x = torch.tensor(fractions)
    abpc = torch.trapezoid(lerf - morf, x, dim=-1)
    return Curves(fractions, morf, lerf, abpc, eligible.sum(-1).cpu())


def default_eligible(model, input_ids, attention_mask, target, position):
    """Real tokens; for token-logit targets only those at or before the last position the target reads (later
    tokens cannot change it)."""
    B, N = input_ids.shape
    eligible = torch.ones(B, N, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
        else attention_mask.bool()
    if not callable(target) or isinstance(target, Contrast):
        if "logits_to_keep" in _forward_parameters(model):
            last = _token_positions(target, input_ids, attention_mask, position).amax(-1)
            eligible &= torch.arange(N, device=input_ids.device)[None, :] <= last[:, None]
    return eligible


# --- ground truth ----------------------------------------------------------------------------------------------
def pointing(relevance, evidence, candidates=None):
    """Top-1 pointing and rank of the evidence, per row.

    evidence: bool (B, N), the tokens that are the true reason; candidates: bool (B, N), the tokens ranked (default
    all). Returns (hit (B,) bool: the most relevant candidate is evidence; rank (B,) long: 1 + the number of
    candidates more relevant than the best-ranked evidence token; ties count against the evidence)."""
    relevance = torch.as_tensor(relevance).float()
    evidence = torch.as_tensor(evidence).bool()
    if relevance.dim() == 1:
        relevance, evidence = relevance[None], evidence[None]
    candidates = torch.ones_like(evidence) if candidates is None else torch.as_tensor(candidates).bool()
    if candidates.dim() == 1:
        candidates = candidates[None]
    if not (relevance.shape == evidence.shape == candidates.shape):
        raise ValueError("relevance, evidence and candidates must have the same shape")
    if not (evidence & candidates).any(-1).all():
        raise ValueError("a row has no evidence token among its candidates")
    r = relevance.masked_fill(~candidates, float("-inf"))
    best_evidence = r.masked_fill(~evidence, float("-inf")).amax(-1)
    others = r.masked_fill(evidence, float("-inf"))
    rank = 1 + (others >= best_evidence[:, None]).sum(-1)
    return rank == 1, rank


# --- everything at once ----------------------------------------------------------------------------------------
def evaluate(model, input_ids, methods=METHODS, *, attention_mask=None, target=None, position=None, steps=10,
             perturb="zero", replace_id=None, eligible=None, batch_size=32, seed=0, ig_steps=32, backend=None,
             evidence=None, progress=None):
    """Each method's attribution, perturbation curves and ABPC on the same inputs and perturbations.

    Returns {method: {"abpc": mean, "abpc_per_row": [...], "morf": mean curve, "lerf": mean curve,
    "fractions": [...], "seconds": attribution time, and with evidence (bool (B, N)) "pointing_accuracy",
    "evidence_rank": mean rank, "ranks": [...]}}. progress(method) is called after each method.
    """
    input_ids, attention_mask = _as_batch(model, input_ids, attention_mask)
    target, _ = fix_target(model, input_ids, attention_mask, target, position)
    if eligible is None:
        eligible = default_eligible(model, input_ids, attention_mask, target, position)
    out = {}
    for method in methods:
        a = attribute(model, input_ids, method, attention_mask=attention_mask, target=target, position=position,
                      backend=backend, ig_steps=ig_steps, seed=seed)
        c = perturbation_curves(model, input_ids, a.relevance, attention_mask=attention_mask, target=target,
                                position=position, steps=steps, perturb=perturb, replace_id=replace_id,
                                eligible=eligible, batch_size=batch_size, seed=seed)
        row = {"abpc": float(c.abpc.mean()), "abpc_per_row": c.abpc.tolist(), "morf": c.morf.mean(0).tolist(),
               "lerf": c.lerf.mean(0).tolist(), "fractions": c.fractions, "seconds": a.seconds}
        if evidence is not None:
            hit, rank = pointing(a.relevance.cpu(), torch.as_tensor(evidence).cpu(), eligible.cpu())
            row.update(pointing_accuracy=float(hit.float().mean()), evidence_rank=float(rank.float().mean()),
                       ranks=rank.tolist())
        out[method] = row
        if progress:
            progress(method)
    return out
