"""Is an explanation faithful? Input-perturbation curves, their area, pointing at known evidence, and the
baseline attribution methods to compare AttnLRP with, all through one interface.

    import attnlrp_fast as af
    from attnlrp_fast.evaluation import evaluate as ev

    r = ev.attribute(model, ids, "attnlrp")                  # or "cp", "grad_x_input", "integrated_gradients",
                                                              # "attention", "random", and the AttnLRP paper's
                                                              # baselines "atman", "smoothgrad", "attention_rollout",
                                                              # "grad_x_attnroll"; "attnlrp[triton]" picks a backend
    r = ev.attribute(model, ids, "atman", options={"atman_group": 8})   # method options: paper_baselines.Options
    c = ev.perturbation_curves(model, ids, r.relevance, target=r.target, steps=10)
    c.abpc                                                    # (B,) area between the curves: higher is better
    table = ev.evaluate(model, ids, methods=ev.METHODS)       # every method, the same perturbations
    rows = ev.deletion_curves(model, ids, r.relevance, generation=[(pos, tok), ...])   # RISE, MAS, RISE+AP

Perturbation (as in the AttnLRP paper): remove the input tokens in steps of a fraction of the eligible tokens,
most relevant first (MoRF) and least relevant first (LeRF), and record the target score (the logit an
explanation explains) each time. A token is removed by zeroing its input embedding (the vector relevance is
defined on; default) or by replacing its id with a pad / mask token (perturb="token"). A faithful explanation
makes the score fall fast under MoRF and slowly under LeRF: ABPC = area(LeRF) - area(MoRF), with the fraction
removed on the x axis from 0 to 1 (trapezoids), so it is in the score's unit (a logit). Ties in the relevance
are broken at random (seeded), so a constant relevance scores like a random one. All variants of one input run
as batches of `batch_size` rows. The settings of a perturbation (steps, perturb, replace_id, batch_size, seed)
are one Perturbation; perturbation_curves and evaluate take it as `perturbation=` or its fields as keywords.

Deletion metrics (evaluation/deletion.py): the same removal, most relevant first in `steps` groups, scored by the
log-probability of a generation (the target's tokens, or a reasoning model's reasoning and answer), normalised,
against the attribution mass removed: RISE, MAS and RISE+AP, lower is better. evaluate() reports them beside ABPC
whenever the target is made of tokens.

The target stays what it was on the unperturbed input: an argmax target is fixed to the token / class it chose.
A callable target f(outputs) -> (B,) must accept outputs whose rows are variants of one input (broadcast).
"""

import contextlib
import time
from dataclasses import dataclass, field, replace

import torch

from attnlrp_fast.bindings.hf import attention_modules
from attnlrp_fast.evaluation import deletion
from attnlrp_fast.evaluation import paper_baselines as pb
from attnlrp_fast.evaluation.capture import capture_attention
from attnlrp_fast.explanation import explain
from attnlrp_fast.inputs import check_inputs, forward_parameters
from attnlrp_fast.lrp_patch import active_handle, attention_backend, lrp
from attnlrp_fast.targets import Contrast, score, target_rows, token_positions

METHODS = ("attnlrp", "cp", "grad_x_input", "integrated_gradients", "attention", "random") + pb.METHODS
# AttnLRP through a reasoning span (attnlrp_fast/reasoning.py): the relevance all hops put on the prompt, with the
# positive part or all of each reasoning token's relevance passed on; need reasoning_span
HOP_METHODS = ("attnlrp_hops_positive", "attnlrp_hops_signed")
_RULES = {"attnlrp": "attnlrp", "cp": "cp", "grad_x_input": "grad", **{m: "attnlrp" for m in HOP_METHODS}}
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


@dataclass
class TargetScore:
    value: torch.Tensor            # (B,) float32: the target score
    target: object                 # the target, an argmax choice fixed to the token / class chosen on this input


@dataclass(frozen=True)
class Perturbation:
    """How the inputs are perturbed: `steps` fractions of the eligible tokens removed (0, 1/steps, ..., 1), by
    zeroing their input embeddings (perturb="zero") or replacing their ids with replace_id ("token"), the variants
    of one input run `batch_size` at a time; ties in the relevance broken in a random order drawn from `seed`."""

    steps: int = 10
    perturb: str = "zero"
    replace_id: int | None = None
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.perturb not in PERTURB:
            raise ValueError(f"perturb must be one of {PERTURB}, got {self.perturb!r}")
        if self.perturb == "token" and self.replace_id is None:
            raise ValueError("perturb='token' needs replace_id (a pad or mask token id)")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")

    @property
    def fractions(self):
        return [s / self.steps for s in range(self.steps + 1)]


def _perturbation(perturbation, fields):
    """A Perturbation from perturbation= or from its fields given as keywords (not both)."""
    if perturbation is None:
        return Perturbation(**fields)
    if fields:
        raise TypeError(f"pass perturbation=Perturbation(...) or its fields as keywords, not both "
                        f"({', '.join(fields)})")
    return perturbation


def _per_row(target):
    """Whether the target holds one id per row (a (B,) tensor)."""
    return isinstance(target, torch.Tensor) and target.dim() == 1


def _chooses_argmax(target):
    """Whether the target picks its token / class on the input (None: argmax; an int or 0-d tensor: a position)."""
    return target is None or isinstance(target, int) or (isinstance(target, torch.Tensor) and target.dim() == 0)


@dataclass(frozen=True, eq=False)
class Case:
    """What is explained: a model, input rows (B, N) with their mask, the target and the position it reads (see
    attnlrp_fast.targets). Case.of checks the inputs as af.explain does."""

    model: torch.nn.Module
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    target: object = None
    position: int | None = None

    @classmethod
    def of(cls, model, input_ids, attention_mask=None, target=None, position=None):
        input_ids, attention_mask = check_inputs(model, input_ids, attention_mask, None)
        return cls(model, input_ids, attention_mask, target, position)

    @property
    def reads_logits(self):
        """Whether the target reads the model's logits (not a callable of its outputs)."""
        return not callable(self.target) or isinstance(self.target, Contrast)

    def token_positions(self):
        """(B, P) positions whose token logits the target reads."""
        return token_positions(self.target, self.input_ids, self.attention_mask, self.position)

    def row(self, b):
        """Row b alone, as a (1, N) case."""
        mask = None if self.attention_mask is None else self.attention_mask[b:b + 1]
        target = self.target[b:b + 1] if _per_row(self.target) else self.target
        return replace(self, input_ids=self.input_ids[b:b + 1], attention_mask=mask, target=target)

    def repeated(self, times):
        """Each row repeated `times` times (row b * times + j is row b)."""
        mask = None if self.attention_mask is None else self.attention_mask.repeat_interleave(times, 0)
        target = self.target.repeat_interleave(times) if _per_row(self.target) else self.target
        return replace(self, input_ids=self.input_ids.repeat_interleave(times, 0), attention_mask=mask, target=target)


@contextlib.contextmanager
def scaled_input_embeddings(model, factor):
    """Inside the block the input-embedding module's output (B, N, D) is multiplied by `factor` (broadcast against
    it); nothing changes when factor is None."""
    if factor is None:
        yield
        return
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output * factor.to(output.dtype))
    try:
        yield
    finally:
        handle.remove()


def _forward_kwargs(case):
    kwargs = {"input_ids": case.input_ids}
    if case.attention_mask is not None:
        kwargs["attention_mask"] = case.attention_mask
    if "use_cache" in forward_parameters(case.model):
        kwargs["use_cache"] = False
    return kwargs


def _forward(case, positions, keep):
    """(the model's outputs on the case's inputs without gradients, the positions its logits were kept at): logits
    only at `positions` (B, P) when the model takes logits_to_keep (else kept is None); keep: (B, N) multiplier on
    the input embeddings."""
    kwargs = _forward_kwargs(case)
    kept = None
    if positions is not None and "logits_to_keep" in forward_parameters(case.model):
        kept = kwargs["logits_to_keep"] = torch.unique(positions)
    with scaled_input_embeddings(case.model, None if keep is None else keep[..., None]), torch.no_grad():
        return case.model(**kwargs), kept


def _score(case, keep=None) -> TargetScore:
    """Target score (B,) without gradients; keep: (B, N) multiplier on the input embeddings."""
    positions = None
    if case.reads_logits and "logits_to_keep" in forward_parameters(case.model):
        positions = case.token_positions()
    outputs, kept = _forward(case, positions, keep)
    with torch.no_grad():
        if not case.reads_logits:
            return TargetScore(case.target(outputs).reshape(-1).float(), case.target)
        if positions is None and outputs.logits.dim() == 3:
            positions = case.token_positions()
        value, ids, _ = score(case.target, outputs.logits, positions, kept)
    target = ids.reshape(ids.shape[0], -1)[:, 0].clone() if _chooses_argmax(case.target) else case.target
    return TargetScore(value.float(), target)


def target_score(model, input_ids, *, attention_mask=None, target=None, position=None, keep=None) -> TargetScore:
    """The target score (B,) of the inputs (no gradients), and the target with an argmax choice fixed.
    keep: (B, N) multiplier on the input embeddings (0 removes a token)."""
    return _score(Case.of(model, input_ids, attention_mask, target, position), keep)


def fix_target(model, input_ids, attention_mask=None, target=None, position=None):
    """The target with an argmax choice fixed to what the model chose on this input, and its score (B,)."""
    s = target_score(model, input_ids, attention_mask=attention_mask, target=target, position=position)
    return s.target, s.value


def parse_method(method):
    """'attnlrp[triton]' -> ('attnlrp', 'triton'); 'cp' -> ('cp', None)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    name, _, rest = method.partition("[")
    backend = rest[:-1] if rest.endswith("]") else (None if not rest else rest)
    if name not in METHODS + HOP_METHODS or (rest and not rest.endswith("]")):
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS + HOP_METHODS)} (attnlrp, cp, "
                         "grad_x_input and the hop methods also as name[torch] / name[triton])")
    if backend is not None and (name not in _RULES or backend not in ("torch", "triton")):
        raise ValueError(f"method {method!r}: a backend in brackets goes with {', '.join(_RULES)} and is 'torch' or "
                         "'triton'")
    return name, backend


# --- attribution methods --------------------------------------------------------------------------------------
def attribute(model, input_ids, method="attnlrp", *, attention_mask=None, target=None, position=None,
              backend=None, ig_steps=32, ig_batch=32, seed=0, reasoning_span=None, hops=None,
              checkpoint=False, options=None, eligible=None) -> Attribution:
    """Relevance (B, N) of each input token for `target` by `method` (see METHODS), on the same footing:

    attnlrp / cp / grad_x_input   af.explain with rule attnlrp / cp / grad (gradient x input on the embeddings)
    attnlrp_hops_positive / _signed   af.explain(..., reasoning_span, hops, reasoning_seed="positive" / "signed"):
                                  e.prompt_relevance, the relevance all hops put on the prompt (hops default:
                                  the span's length, after which none is left in the reasoning)
    integrated_gradients          x * mean over ig_steps points a of grad f(a x) on the path from 0 to the input
                                  embeddings (midpoint rule, batched ig_batch rows at a time)
    attention                     last layer's attention weights from the target position(s), mean over heads
    random                        uniform random numbers (seeded)

    The AttnLRP paper's baselines (evaluation/paper_baselines.py states what each computes), with `options` (a dict
    of paper_baselines.Options fields, or an Options; an unknown name is a ValueError):
    atman                         AtMan: target score minus the score with the token's attention scores suppressed
                                  (factor 1 - 0.9, conceptual suppression at cosine >= 0.7), one forward per token
                                  or per run of atman_group tokens, atman_batch variants per forward
    smoothgrad                    SmoothGrad x input: x * mean over smoothgrad_samples (16) of the gradient at
                                  x + N(0, (0.1 (max - min))^2) noise (smoothgrad_noise), noise drawn from `seed`
    attention_rollout             the target row of the rollout of 0.5 A + 0.5 I (A: mean over heads), top layer down
    grad_x_attnroll               Chefer et al.'s R = R + mean_h (grad_A * A)^+ R from R = I: R's target row
    eligible: bool (B, N), the tokens AtMan suppresses one by one (default: the real ones up to the last position the
    target reads); the others get 0. evaluate() passes the tokens it ranks.
    """
    name, bracket = parse_method(method)
    backend = bracket or backend
    opts = pb.Options.of(options)
    case = Case.of(model, input_ids, attention_mask, target, position)
    on_input = _score(case)
    case = replace(case, target=on_input.target)
    t = time.perf_counter()
    if name in HOP_METHODS:
        if reasoning_span is None:
            raise ValueError(f"method {method!r} needs reasoning_span=(start, end)")
        rel = _explain_hops(case, reasoning_span, hops, name.rsplit("_", 1)[1], backend, checkpoint)
    elif name in _RULES:
        rel = _explain(case, _RULES[name], backend, checkpoint)
    elif name == "integrated_gradients":
        rel = _integrated_gradients(case, ig_steps, ig_batch, backend, checkpoint)
    elif name == "attention":
        rel = _last_layer_attention(case, backend)
    elif name == "atman":
        rel = _atman(case, opts, None if eligible is None else _per_token(eligible, case, "eligible").bool(), backend)
    elif name == "smoothgrad":
        rel = _smoothgrad(case, opts, backend, checkpoint, seed)
    elif name == "attention_rollout":
        rel = _attention_rollout(case, backend)
    elif name == "grad_x_attnroll":
        rel = _grad_x_attnroll(case, backend, checkpoint)
    else:
        g = torch.Generator().manual_seed(seed)
        rel = torch.rand(case.input_ids.shape, generator=g).to(case.input_ids.device)
    if case.attention_mask is not None:
        rel = rel * case.attention_mask.to(rel.dtype)
    return Attribution(rel.float(), method, case.target, on_input.value, time.perf_counter() - t)


def _explain(case, rule, backend, checkpoint=False):
    return explain(case.model, input_ids=case.input_ids, attention_mask=case.attention_mask, target=case.target,
                   position=case.position, rule=rule, backend=backend, checkpoint=checkpoint).relevance


def _explain_hops(case, span, hops, seed, backend, checkpoint=False):
    start, end = span
    e = explain(case.model, input_ids=case.input_ids, attention_mask=case.attention_mask, target=case.target,
                position=case.position, backend=backend, reasoning_span=span,
                hops=end - start if hops is None else hops, reasoning_seed=seed, checkpoint=checkpoint)
    return e.prompt_relevance


def integrated_gradients(model, input_ids, attention_mask, target, position, steps=32, batch=32, backend=None):
    """Integrated gradients from the zero embedding, on the output of the input-embedding module (where AttnLRP's
    relevance is defined). Each of the B x steps path points is one batch row."""
    return _integrated_gradients(Case.of(model, input_ids, attention_mask, target, position), steps, batch, backend)


def _integrated_gradients(case, steps, batch, backend, checkpoint=False):
    if steps < 1:
        raise ValueError(f"ig_steps must be at least 1, got {steps}")
    B, N = case.input_ids.shape
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    total = torch.zeros(B, N, device=case.input_ids.device)
    per_call = max(1, batch // B)                       # path points per call
    for i in range(0, steps, per_call):
        a = alphas[i:i + per_call].to(case.input_ids.device)
        s = a.numel()
        # row b * s + j has alpha a[j]; this hook runs before explain's own on the same module
        with scaled_input_embeddings(case.model, a.repeat(B)[:, None, None]):
            rel = _explain(case.repeated(s), "grad", backend, checkpoint)
        # relevance of the scaled input is (a x) * g(a x): divide by a for x * g(a x)
        total += (rel.reshape(B, s, N) / a[None, :, None]).sum(1)
    return total / steps


def last_layer_attention(model, input_ids, attention_mask, target, position, backend=None):
    """Mean over heads (and over the target positions) of the last attention layer's weights from the position(s)
    whose logits the target reads; for classification heads, from the first token ([CLS]). O(N) memory: only
    those rows are formed."""
    return _last_layer_attention(Case.of(model, input_ids, attention_mask, target, position), backend)


def _last_layer_attention(case, backend):
    model = case.model
    # the capture records what the engine's attention is given (af.lrp routes attention through the engine; the
    # forward is the same under every rule)
    with _routed(model, backend):
        seen = capture_attention(model, attention_modules(model)[-1], lambda: _score(case))
    return _attention_weights(seen, _attention_rows(case))


def _attention_rows(case):
    """(B, P) the query positions whose attention weights the baseline reads: the target's positions on a token
    model; the last real position for a callable target on a token model; the first token ([CLS]) otherwise."""
    ids = case.input_ids
    logits_model = "logits_to_keep" in forward_parameters(case.model)
    if case.reads_logits and logits_model:
        return case.token_positions()
    if logits_model:
        return target_rows(ids, case.attention_mask, None, ids.shape[1])[:, None]
    return torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)


def _attention_weights(seen, positions):
    """(B, M) softmax weights of the captured attention from the query rows `positions` (B, P), mean over heads
    and rows."""
    w = pb.attention_probabilities(seen.query.float(), seen.key.float(), positions, scale=seen.scaling,
                                   softcap=seen.softcap, window=seen.window or None, causal=seen.causal,
                                   key_padding_mask=seen.key_padding_mask)        # (B, H, P, M)
    return w.mean(dim=(1, 2))


# --- the AttnLRP paper's baselines (their math: evaluation/paper_baselines.py) ----------------------------------
def _atman(case, opts, explained=None, backend=None):
    """AtMan: per row, the target score without suppression minus with each run of atman_group explained tokens
    suppressed (the explained tokens: default _default_eligible's, the real ones the target can depend on)."""
    model = case.model
    B, N = case.input_ids.shape
    explained = _default_eligible(case) if explained is None else explained
    real = torch.ones_like(explained) if case.attention_mask is None else case.attention_mask.bool()
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(case.input_ids)
    rel = torch.zeros(B, N, device=case.input_ids.device)
    routed = attention_backend(model, backend) if backend else contextlib.nullcontext()
    with routed, pb.suppressing(model, attention_modules(model)) as suppress:
        for b in range(B):
            row = case.row(b)
            groups = pb.atman_groups(explained[b], opts.atman_group)
            if not groups:
                continue
            suppress(None)
            clean = _score(row).value[0]
            for i in range(0, len(groups), opts.atman_batch):
                chunk = groups[i:i + opts.atman_batch]
                suppress(pb.atman_multipliers(embeddings[b], real[b], chunk, opts.atman_factor, opts.atman_kappa))
                drop = clean - _score(row.repeated(len(chunk))).value
                for idx, d in zip(chunk, drop.tolist()):
                    rel[b, idx] = d / idx.numel()
    return rel


def _smoothgrad(case, opts, backend, checkpoint, seed):
    """SmoothGrad x input: af.explain (rule "grad") on noisy embeddings, the relevance x * g(x + noise) averaged
    over the samples; the samples of all rows run smoothgrad_batch rows per explanation."""
    B, N = case.input_ids.shape
    S = opts.smoothgrad_samples
    with torch.no_grad():
        x = case.model.get_input_embeddings()(case.input_ids)
    real = torch.ones(B, N, dtype=torch.bool, device=x.device) if case.attention_mask is None \
        else case.attention_mask.bool()
    sigma = pb.smoothgrad_sigma(x, real, opts.smoothgrad_noise)
    noise = pb.smoothgrad_noise(x.shape, sigma, S, seed, x.device, x.dtype)          # (S, B, N, D)
    total = torch.zeros(B, N, device=x.device)
    per_call = max(1, opts.smoothgrad_batch // B)
    for i in range(0, S, per_call):
        part = noise[i:i + per_call]
        s = part.shape[0]
        # row b * s + j: sample i + j of row b (Case.repeated's order)
        with pb.added_to_input_embeddings(case.model, part.transpose(0, 1).reshape(B * s, N, -1)):
            rel = _explain(case.repeated(s), "grad", backend, checkpoint)
        total += rel.reshape(B, s, N).sum(1)
    return total / S


def _target_rows_start(case, N):
    """(B, N): 1 / P at each of a row's P target positions (_attention_rows), the row vector rollouts start from."""
    rows = _attention_rows(case)
    start = torch.zeros(rows.shape[0], N, device=rows.device)
    return start.scatter_add_(1, rows, torch.full(rows.shape, 1.0 / rows.shape[1], device=rows.device))


def _routed(model, backend):
    """af.lrp(model, "grad") unless the model is inside af.lrp already: the attention goes through the engine."""
    return contextlib.nullcontext() if active_handle(model) is not None else lrp(model, "grad", backend=backend)


def _attention_rollout(case, backend):
    """Attention rollout: every layer's query and key recorded in one forward, the target row carried down."""
    model = case.model
    with _routed(model, backend), pb.recording(model, attention_modules(model)) as records:
        _score(case)
    if not records:
        raise RuntimeError(f"{type(model).__name__}: no attention layer ran through the engine's attention")
    return pb.rollout(list(records), _target_rows_start(case, case.input_ids.shape[1]))


def _grad_x_attnroll(case, backend, checkpoint):
    """Grad x AttnRoll: one af.explain pass (rule "grad") that records every layer's query, key, value and output
    gradient, then the target row carried down."""
    model = case.model
    with _routed(model, backend), pb.recording(model, attention_modules(model), values=True) as records:
        _explain(case, "grad", backend, checkpoint)
    if not records:
        raise RuntimeError(f"{type(model).__name__}: no attention layer ran through the engine's attention")
    return pb.grad_rollout(list(records), _target_rows_start(case, case.input_ids.shape[1]))


# --- perturbation ----------------------------------------------------------------------------------------------
def _order(relevance, eligible, generator):
    """Eligible positions sorted by relevance, most relevant first; ties in random (seeded) order."""
    idx = eligible.nonzero().flatten()
    perm = idx[torch.randperm(idx.numel(), generator=generator).to(idx.device)]
    vals = relevance[perm]
    order = torch.sort(vals, descending=True, stable=True).indices
    return perm[order]


def _per_token(x, case, name):
    """x as a (B, N) tensor on the inputs' device (a (N,) one taken as one row); ValueError on another shape."""
    x = torch.as_tensor(x).to(case.input_ids.device)
    if x.dim() == 1:
        x = x[None]
    if tuple(x.shape) != tuple(case.input_ids.shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, the input {tuple(case.input_ids.shape)}")
    return x


def perturbation_curves(model, input_ids, relevance, *, attention_mask=None, target=None, position=None,
                        eligible=None, perturbation=None, **fields) -> Curves:
    """MoRF and LeRF curves of the target score and their ABPC for each input row.

    eligible: bool (B, N), the tokens that may be removed (default: every real token up to the last position the
              target reads, for token-logit models; every real token otherwise). Protect special tokens here.
    perturbation: a Perturbation, or its fields as keywords (steps=10, perturb="zero" | "token",
              replace_id=None, batch_size=32, seed=0).
    """
    perturbation = _perturbation(perturbation, fields)
    case = Case.of(model, input_ids, attention_mask, target, position)
    relevance = _per_token(relevance, case, "relevance").float()
    if not torch.isfinite(relevance).all():
        raise ValueError("relevance holds NaN or inf")
    if _chooses_argmax(case.target):   # a fixed target needs no forward here (evaluate and attribute fix it already)
        case = replace(case, target=_score(case).target)
    eligible = _per_token(_default_eligible(case) if eligible is None else eligible, case, "eligible").bool()
    return _curves(case, relevance, eligible, perturbation)


def _curves(case, relevance, eligible, p):
    g = torch.Generator().manual_seed(p.seed)
    scores = torch.stack([_row_scores(case.row(b), _order(relevance[b], eligible[b], g), p)
                          for b in range(relevance.shape[0])])               # (B, 2 (S + 1))
    morf, lerf = scores[:, :p.steps + 1].contiguous(), scores[:, p.steps + 1:].contiguous()
    abpc = torch.trapezoid(lerf - morf, torch.tensor(p.fractions), dim=-1)
    return Curves(p.fractions, morf, lerf, abpc, eligible.sum(-1).cpu())


def _keeps(order, n_tokens, fractions):
    """(2 (S + 1), N) input-embedding multipliers: row j removes (0) the first round(fractions[j] * n) tokens of
    `order` (MoRF), row S + 1 + j as many from its end (LeRF); 1 elsewhere."""
    n = order.numel()
    keeps = torch.ones(2 * len(fractions), n_tokens, device=order.device)
    for i, ranked in enumerate((order, order.flip(0))):
        for j, f in enumerate(fractions):
            keeps[i * len(fractions) + j, ranked[:round(f * n)]] = 0.0
    return keeps


def _variant_scores(row, keeps, p, scorer):
    """scorer(variants, keep) (V,) of one row's variants, keeps (V, N) (0: removed), p.batch_size at a time:
    zeroed embeddings (keep passed on) or replaced ids (keep None)."""
    scores = []
    for keep in keeps.split(p.batch_size):
        variants = row.repeated(keep.shape[0])
        if p.perturb == "token":
            ids = variants.input_ids
            ids = torch.where(keep.bool(), ids, torch.full_like(ids, int(p.replace_id)))
            variants = replace(variants, input_ids=ids)
        scores.append(scorer(variants, keep if p.perturb == "zero" else None).cpu())
    return torch.cat(scores)


def _row_scores(row, order, p):
    """The target scores (2 (S + 1),) of one row's variants: MoRF, then LeRF (the rows of _keeps)."""
    return _variant_scores(row, _keeps(order, row.input_ids.shape[1], p.fractions), p,
                           lambda variants, keep: _score(variants, keep).value)


# --- deletion metrics of a generation (RISE, MAS, RISE+AP: evaluation/deletion.py) --------------------------------
@dataclass(frozen=True)
class Generation:
    """Tokens whose log-probability the deletion metrics score: ids (B, P), each predicted at positions (B, P)
    (a classification head: the class, positions unused)."""
    positions: torch.Tensor
    ids: torch.Tensor

    def row(self, b, times=1):
        return Generation(self.positions[b:b + 1].expand(times, -1), self.ids[b:b + 1].expand(times, -1))


def _generation(case, generation):
    """The Generation of `generation` (a list of (position, token_id) pairs for every row, or a (positions, ids)
    pair of tensors, (P,) or (B, P)); None: the target's tokens (a list target's pairs, an argmax/int/(B,) target's
    token at its position), or None when the target has no tokens (callable, contrast)."""
    B, N = case.input_ids.shape
    device = case.input_ids.device
    if generation is None:
        t = case.target
        if not case.reads_logits or isinstance(t, Contrast):
            return None
        positions = case.token_positions()
        if isinstance(t, (list, tuple)):
            ids = torch.tensor([tok for _, tok in t], device=device)[None]
        else:
            ids = (t.to(device)[:, None] if _per_row(t) else torch.full((B, 1), int(t), device=device))
        return Generation(positions.expand(B, -1), ids.expand(B, -1))
    if isinstance(generation, (list, tuple)) and generation and all(
            isinstance(x, (list, tuple)) and len(x) == 2 and not isinstance(x[0], torch.Tensor) for x in generation):
        positions = token_positions(list(generation), case.input_ids, None, None)
        ids = torch.tensor([int(tok) for _, tok in generation], device=device).expand(B, -1)
        return Generation(positions.expand(B, -1), ids)
    if isinstance(generation, tuple) and len(generation) == 2 and all(isinstance(x, torch.Tensor) for x in generation):
        positions, ids = (x.to(device).long() for x in generation)
        positions, ids = (x[None] if x.dim() == 1 else x for x in (positions, ids))
        positions, ids = positions.expand(B, -1), ids.expand(B, -1)
        if positions.shape != ids.shape or (positions < 0).any() or (positions >= N).any():
            raise ValueError(f"generation: positions {tuple(positions.shape)} and ids {tuple(ids.shape)} must match "
                             f"and the positions lie in [0, {N})")
        return Generation(positions, ids)
    raise TypeError("generation must be a list of (position, token_id) pairs or a (positions, ids) pair of tensors")


def _log_probability(case, gen, keep=None):
    """log p of the generation's tokens, summed per row (B,) (no gradients); keep as in _score."""
    outputs, kept = _forward(case, gen.positions, keep)
    logits = outputs.logits.float()
    if logits.dim() == 2:                                            # classification head: the class
        picked = logits.log_softmax(-1).gather(-1, gen.ids[:, :1])
    else:
        col = torch.searchsorted(kept, gen.positions.contiguous()) if kept is not None else gen.positions
        rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
        if not gen.ids.is_meta and ((gen.ids < 0).any() or (gen.ids >= logits.shape[-1]).any()):
            raise ValueError(f"generation token id outside the model's {logits.shape[-1]} outputs")
        picked = logits[rows, col].log_softmax(-1).gather(-1, gen.ids[..., None])[..., 0]
    return picked.sum(-1)


def deletion_curves(model, input_ids, relevance, *, attention_mask=None, target=None, position=None,
                    generation=None, eligible=None, perturbation=None, **fields):
    """RISE, MAS and RISE+AP (evaluation/deletion.py; lower is better) of `relevance` for each row: a list of
    {"rise", "mas", "rise_ap", "scores" (s_0 .. s_k), "normalized", "density"}.

    generation: the tokens whose log-probability is scored (default: the target's; see _generation), e.g. the
    reasoning and the answer of a reasoning model. eligible, perturbation: as in perturbation_curves (steps = k).
    """
    perturbation = _perturbation(perturbation, fields)
    case = Case.of(model, input_ids, attention_mask, target, position)
    relevance = _per_token(relevance, case, "relevance").float()
    if not torch.isfinite(relevance).all():
        raise ValueError("relevance holds NaN or inf")
    if _chooses_argmax(case.target):
        case = replace(case, target=_score(case).target)
    gen = _generation(case, generation)
    if gen is None:
        raise ValueError("the deletion metrics score the log-probability of tokens: this target has none (callable "
                         "or contrast); pass generation=[(position, token_id), ...]")
    eligible = _per_token(_default_eligible(case) if eligible is None else eligible, case, "eligible").bool()
    return _deletion(case, relevance, eligible, gen, perturbation)


def _deletion(case, relevance, eligible, gen, p):
    g = torch.Generator().manual_seed(p.seed)
    out = []
    for b in range(relevance.shape[0]):
        order = _order(relevance[b], eligible[b], g)
        sizes = deletion.group_sizes(order.numel(), p.steps)
        keeps = torch.ones(len(sizes) + 1, case.input_ids.shape[1], device=order.device)
        for i, group in enumerate(order.split(sizes)):
            keeps[i + 1:, group] = 0.0
        scores = _variant_scores(case.row(b), keeps, p, lambda variants, keep: _log_probability(
            variants, gen.row(b, variants.input_ids.shape[0]), keep))
        row = deletion.metrics(scores, deletion.density(relevance[b][order].cpu(), sizes))
        row["scores"] = scores.tolist()
        out.append(row)
    return out


def default_eligible(model, input_ids, attention_mask, target, position):
    """Real tokens; for token-logit targets only those at or before the last position the target reads (later
    tokens cannot change it)."""
    return _default_eligible(Case.of(model, input_ids, attention_mask, target, position))


def _default_eligible(case):
    B, N = case.input_ids.shape
    device = case.input_ids.device
    eligible = torch.ones(B, N, dtype=torch.bool, device=device) if case.attention_mask is None \
        else case.attention_mask.bool()
    if case.reads_logits and "logits_to_keep" in forward_parameters(case.model):
        last = case.token_positions().amax(-1)
        eligible = eligible & (torch.arange(N, device=device)[None, :] <= last[:, None])
    return eligible


# --- ground truth ----------------------------------------------------------------------------------------------
def pointing(relevance, evidence, candidates=None):
    """Top-1 pointing and rank of the evidence, per row.

    evidence: bool (B, N), the tokens that are the true reason; candidates: bool (B, N), the tokens ranked (default
    all). Returns (hit (B,) bool: the most relevant candidate is evidence; rank (B,) long: 1 + the number of
    candidates more relevant than the best-ranked evidence token; ties count against the evidence)."""
    relevance, evidence, candidates = _evidence_rows(relevance, evidence, candidates)
    if not (evidence & candidates).any(-1).all():
        raise ValueError("a row has no evidence token among its candidates")
    r = relevance.masked_fill(~candidates, float("-inf"))
    best_evidence = r.masked_fill(~evidence, float("-inf")).amax(-1)
    others = r.masked_fill(evidence, float("-inf"))
    rank = 1 + (others >= best_evidence[:, None]).sum(-1)
    return rank == 1, rank


def evidence_share(relevance, evidence, candidates=None):
    """(B,) the evidence's share of the candidates' positive relevance (0 where no candidate has any)."""
    relevance, evidence, _ = _evidence_rows(relevance, evidence, None)
    positive = relevance.clamp(min=0)
    if candidates is not None:      # (N,) candidates serve every row
        candidates = torch.as_tensor(candidates).bool()
        positive = positive * (candidates[None] if candidates.dim() == 1 else candidates)
    total = positive.sum(-1)
    return torch.where(total > 0, (positive * evidence).sum(-1) / total.clamp(min=1e-30), 0.0)


def _evidence_rows(relevance, evidence, candidates):
    """relevance (float), evidence and candidates (bool; default all) as (B, N) rows of one shape: a (N,) one is one
    row; ValueError when the shapes differ."""
    relevance = torch.as_tensor(relevance).float()
    evidence = torch.as_tensor(evidence).bool()
    if relevance.dim() == 1:
        relevance, evidence = relevance[None], evidence[None]
    candidates = torch.ones_like(evidence) if candidates is None else torch.as_tensor(candidates).bool()
    if candidates.dim() == 1:
        candidates = candidates[None]
    if not (relevance.shape == evidence.shape == candidates.shape):
        raise ValueError("relevance, evidence and candidates must have the same shape")
    return relevance, evidence, candidates


# --- everything at once ----------------------------------------------------------------------------------------
def evaluate(model, input_ids, methods=METHODS, *, attention_mask=None, target=None, position=None, eligible=None,
             evidence=None, backend=None, ig_steps=32, progress=None, perturbation=None, on_result=None,
             generation=None, reasoning_span=None, hops=None, curves=True, checkpoint=False, options=None,
             **fields):
    """Each method's attribution, perturbation curves and ABPC, and the deletion metrics, on the same inputs and
    perturbations.

    perturbation: a Perturbation, or its fields as keywords (steps, perturb, replace_id, batch_size, seed; the
    seed also seeds the random method). Returns {method: {"abpc": mean, "abpc_per_row": [...], "morf": mean
    curve, "lerf": mean curve, "fractions": [...], "seconds": attribution time, and with evidence (bool (B, N))
    "pointing_accuracy", "evidence_rank": mean rank, "ranks": [...], "evidence_share": the evidence's mean share of
    the eligible tokens' positive relevance}}. When the target (or `generation`) has tokens, also "rise", "mas",
    "rise_ap" (means; lower is better), their "..._per_row" and "degenerate" (deletion_curves, with the same steps).
    curves=False: no perturbation at all (no ABPC, curves or deletion metrics), the attribution and its pointing
    only. checkpoint=True: the gradient methods checkpoint every layer (af.explain's checkpoint, for long inputs).
    reasoning_span / hops: for the hop methods (HOP_METHODS). options: the paper baselines' settings (attribute's).
    progress(method) is called after each, and
    on_result(method, its result) as soon as that result is there (partial reports).
    """
    perturbation = _perturbation(perturbation, fields)
    options = pb.Options.of(options)          # checked before any method runs
    case = Case.of(model, input_ids, attention_mask, target, position)
    out = {}
    # every forward runs on `backend`, the target's and the perturbed ones too (models loaded with the engine's
    # attention would otherwise take the automatic choice: Triton's interpreter on CPU under TRITON_INTERPRET=1)
    with attention_backend(model, backend) if backend else contextlib.nullcontext():
        case = replace(case, target=_score(case).target)
        eligible = _per_token(_default_eligible(case) if eligible is None else eligible, case, "eligible").bool()
        gen = _generation(case, generation)
        for method in methods:
            out[method] = _evaluate_method(case, method, eligible, evidence, perturbation, gen,
                                           {"backend": backend, "ig_steps": ig_steps, "seed": perturbation.seed,
                                            "reasoning_span": reasoning_span, "hops": hops,
                                            "checkpoint": checkpoint, "options": options}, curves)
            if on_result:
                on_result(method, out[method])
            if progress:
                progress(method)
    return out


def _evaluate_method(case, method, eligible, evidence, perturbation, gen, options, curves=True):
    a = attribute(case.model, case.input_ids, method, attention_mask=case.attention_mask, target=case.target,
                  position=case.position, eligible=eligible, **options)
    row = {}
    if curves:
        c = perturbation_curves(case.model, case.input_ids, a.relevance, attention_mask=case.attention_mask,
                                target=case.target, position=case.position, eligible=eligible,
                                perturbation=perturbation)
        row.update(abpc=float(c.abpc.mean()), abpc_per_row=c.abpc.tolist(), morf=c.morf.mean(0).tolist(),
                   lerf=c.lerf.mean(0).tolist(), fractions=c.fractions)
    row["seconds"] = a.seconds
    if evidence is not None:
        relevance, evidence = a.relevance.cpu(), torch.as_tensor(evidence).cpu()
        hit, rank = pointing(relevance, evidence, eligible.cpu())
        share = evidence_share(relevance, evidence, eligible.cpu())
        row.update(pointing_accuracy=float(hit.float().mean()), evidence_rank=float(rank.float().mean()),
                   ranks=rank.tolist(), evidence_share=float(share.mean()))
    if curves and gen is not None:
        row.update(deletion.summary(_deletion(case, a.relevance, eligible, gen, perturbation)))
    return row
