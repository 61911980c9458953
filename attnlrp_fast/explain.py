"""af.explain(): one forward and one backward pass give the relevance of every input token (and of any
module's output) for a target score of a HuggingFace model.

Relevance of token i = sum_d e[i, d] * g(e)[i, d], where e is the output of the model's input-embedding module
and g the modified gradient of the rule (DESIGN.md section 1), seeded with g(target score) = 1 so that the
relevance of the target is its logit. Under Gemma2/3's final logit softcap the identity rule applies there too.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from attnlrp_fast.lrp import active_handle, lrp
from attnlrp_fast.memory import maybe_low_memory


@dataclass(frozen=True)
class Contrast:
    """Target "logit of `this` minus logit of `that`" (tokens at the target position, or classes)."""

    this: int
    that: int


def contrast(this: int, that: int) -> Contrast:
    """A contrastive target for explain(): why `this` rather than `that`."""
    return Contrast(int(this), int(that))


@dataclass
class Explanation:
    relevance: torch.Tensor                 # (B, N) float32: input-token (or image-patch) relevance
    target_ids: Optional[torch.Tensor]      # (B,) explained token/class ids; (B, P) for several; None for callables
    target_logit: torch.Tensor              # (B,) float32: the explained score (= total relevance seeded)
    rule: str
    latent: dict = field(default_factory=dict)   # name -> (B, N, D) float32 relevance of that module's output
    positions: Optional[torch.Tensor] = None     # (B,) or (B, P) positions whose logits were explained
    target_logits: Optional[torch.Tensor] = None  # (B, P) float32: each (position, token) target's own logit

    def top_neurons(self, name: str, k: int = 10):
        """The k neurons of latent `name` with the largest relevance summed over batch and positions:
        (values, indices), each (k,)."""
        r = self._latent(name)
        total = r.reshape(-1, r.shape[-1]).sum(0)
        return total.topk(min(k, total.numel()))

    def head_relevance(self, name: str, num_heads: int) -> torch.Tensor:
        """Relevance of latent `name` (e.g. "model.layers.3.self_attn.o_proj:input") per attention head:
        (B, N, num_heads)."""
        r = self._latent(name)
        if r.shape[-1] % num_heads:
            raise ValueError(f"latent {name!r} has {r.shape[-1]} features, not a multiple of {num_heads} heads")
        return r.reshape(*r.shape[:-1], num_heads, -1).sum(-1)

    def _latent(self, name):
        if name not in self.latent:
            raise KeyError(f"no latent {name!r}; explained latents: {sorted(self.latent)}")
        return self.latent[name]


def explain(model, input_ids=None, attention_mask=None, target=None, rule=None, latent=(), backend=None, *,
            position=None, pixel_values=None, checkpoint=False, mlp_chunk=1024, progress=None) -> Explanation:
    """Explain `target` of `model` on `input_ids` (or `pixel_values` for ViT) with `rule`.

    target: None = argmax at the target position (classification heads: the argmax class); an int token/class id;
            a list of (position, token_id) pairs (relevance of the sum of their logits); contrast(a, b) for
            logit(a) - logit(b); or a callable f(model_outputs) -> (B,) tensor (any scalar of the output).
    rule: "attnlrp" (default), "cp" or "grad"; inside `with af.lrp(model, rule)` the active rule (a different one
          is an error). explain() applies lrp(model, rule) for the call when the model is not inside lrp().
    latent: module names whose output relevance to return; "name:input" for the module's input instead.
    position: the position whose logits int/None/contrast targets read (default: each row's last real token).
    checkpoint: checkpoint every transformer layer and run MLPs in chunks of `mlp_chunk` tokens (af.low_memory),
          for long inputs: memory O(N * hidden) with a small constant, at the cost of a second forward.
    progress: called with "forward" / "backward" per transformer layer (progress bars).
    """
    handle = active_handle(model)
    if handle is not None:
        if rule is not None and rule != handle.rule:
            raise ValueError(f"the model is inside af.lrp(rule={handle.rule!r}) but explain() was asked for rule={rule!r}")
        if backend is not None and backend != handle.backend:
            raise ValueError(f"the model is inside af.lrp(backend={handle.backend!r}); explain() got backend={backend!r}")
        scope, active_rule = contextlib.nullcontext(handle), handle.rule
    else:
        active_rule = rule or "attnlrp"
        scope = lrp(model, active_rule, backend=backend)
    with scope as h, maybe_low_memory(model, checkpoint or progress is not None, checkpoint=checkpoint,
                                      mlp_chunk=mlp_chunk if checkpoint else 0, progress=progress):
        return _explain(model, h, input_ids, attention_mask, target, active_rule, latent, position, pixel_values)


def _device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_inputs(model, input_ids, attention_mask, pixel_values):
    device = _device(model)
    if (input_ids is None) == (pixel_values is None):
        raise ValueError("pass exactly one of input_ids (token models) or pixel_values (vision models)")
    if pixel_values is not None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError("pixel_values must be a (B, C, H, W) tensor")
        if pixel_values.device != device:
            raise ValueError(f"pixel_values is on {pixel_values.device} but the model is on {device}")
        return None, None
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (B, N) with N > 0, got {tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if vocab is not None and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise ValueError(f"input_ids holds ids outside the model's vocabulary [0, {vocab})")
    if attention_mask is not None:
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
        if not attention_mask.bool().any(-1).all():
            raise ValueError("attention_mask leaves a row with no real token")
    return input_ids, attention_mask


class _Capture:
    """Forward hooks: the input-embedding output as a leaf that requires grad, latent outputs/inputs, and the
    output-embedding (lm_head) output for the final-softcap identity rule."""

    def __init__(self, model, latent, want_pre_logits):
        self.handles, self.latent, self.embeds, self.pre_logits = [], {}, None, None
        self.frozen = False  # set after the forward: checkpointed layers re-run their hooks in the backward
        emb = model.get_input_embeddings()
        if emb is None:
            raise ValueError(f"{type(model).__name__} has no input-embedding module (get_input_embeddings())")
        self.handles.append(emb.register_forward_hook(self._embeds_hook))
        for spec in latent:
            name, _, where = spec.partition(":")
            if where not in ("", "input"):
                raise ValueError(f"latent {spec!r}: use 'module.name' or 'module.name:input'")
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"latent {spec!r}: the model has no module named {name!r}") from None
            if where == "input":
                self.handles.append(module.register_forward_pre_hook(self._store(spec, from_input=True)))
            else:
                self.handles.append(module.register_forward_hook(self._store(spec)))
        if want_pre_logits:
            head = model.get_output_embeddings()
            self.handles.append(head.register_forward_hook(lambda m, i, o: setattr(self, "pre_logits", o)))

    def _embeds_hook(self, module, inputs, output):
        if self.frozen:
            return None
        self.embeds = output.detach().requires_grad_(True)
        return self.embeds

    def _store(self, spec, from_input=False):
        def hook(module, *args):
            if self.frozen:
                return
            value = args[0] if from_input else args[1]
            if isinstance(value, (tuple, list)):
                value = value[0]
            self.latent[spec] = value
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _target_rows(input_ids, attention_mask, position, n):
    """Per-row position of the logits an int/None/contrast target reads."""
    B = input_ids.shape[0]
    if position is not None:
        p = int(position) + (n if int(position) < 0 else 0)
        if not 0 <= p < n:
            raise ValueError(f"position {position} is outside the sequence of length {n}")
        return torch.full((B,), p, dtype=torch.long, device=input_ids.device)
    if attention_mask is None:
        return torch.full((B,), n - 1, dtype=torch.long, device=input_ids.device)
    # the last real token of each row (right padding) or the last position (left padding)
    idx = torch.arange(n, device=input_ids.device).expand(B, n)
    return torch.where(attention_mask.bool(), idx, -1).amax(-1)


def _token_positions(target, input_ids, attention_mask, position):
    """(B, P) positions whose logits the target reads, for token-level logits."""
    n = input_ids.shape[1]
    if isinstance(target, (list, tuple)) and not isinstance(target, Contrast):
        if not target or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in target):
            raise ValueError("a list target holds (position, token_id) pairs")
        pos = []
        for p, _ in target:
            q = int(p) + (n if int(p) < 0 else 0)
            if not 0 <= q < n:
                raise ValueError(f"target position {p} is outside the sequence of length {n}")
            pos.append(q)
        return torch.tensor(pos, device=input_ids.device).expand(input_ids.shape[0], -1)
    return _target_rows(input_ids, attention_mask, position, n)[:, None]


def _score(target, logits, positions, kept):
    """Target score per row (B,) and the explained ids, from logits (B, C) or (B, P_kept, V)."""
    B = logits.shape[0]
    rows = torch.arange(B, device=logits.device)
    if logits.dim() == 2:  # classification head
        if isinstance(target, (list, tuple)):
            raise ValueError("(position, token) targets need token logits; this model outputs class logits")
        sel = logits
    else:
        col = torch.searchsorted(kept, positions.contiguous()) if kept is not None else positions
        sel = logits[rows[:, None], col]  # (B, P, V)
    vocab = sel.shape[-1]

    def check(ids):
        if (ids < 0).any() or (ids >= vocab).any():
            raise ValueError(f"target id outside the model's {vocab} outputs")
        return ids

    if isinstance(target, Contrast):
        a, b = (check(torch.tensor([t], device=logits.device)) for t in (target.this, target.that))
        pick = sel[..., a.item()] - sel[..., b.item()]
        ids = torch.tensor([target.this, target.that], device=logits.device).expand(B, 2)
        return pick.reshape(B, -1).sum(-1), ids, None
    if isinstance(target, (list, tuple)):
        ids = check(torch.tensor([t for _, t in target], device=logits.device)).expand(B, -1)
        parts = sel.gather(-1, ids[..., None])[..., 0]
        return parts.sum(-1), ids, parts
    if target is None:
        ids = sel.detach().argmax(-1)
    elif isinstance(target, int) or (isinstance(target, torch.Tensor) and target.dim() == 0):
        ids = check(torch.full(sel.shape[:-1], int(target), device=logits.device))
    elif isinstance(target, torch.Tensor) and target.shape == (B,):
        ids = check(target.to(logits.device).reshape((B,) + (1,) * (sel.dim() - 2)).expand(sel.shape[:-1]))
    else:
        raise TypeError("target must be None, an int, a (B,) tensor of ids, a list of (position, token_id), "
                        "contrast(a, b) or a callable f(outputs) -> (B,)")
    score = sel.gather(-1, ids[..., None])[..., 0]
    return score.reshape(B, -1).sum(-1), (ids.reshape(B, -1)[:, 0] if ids.dim() > 1 else ids), None


def _explain(model, handle, input_ids, attention_mask, target, rule, latent, position, pixel_values):
    input_ids, attention_mask = _check_inputs(model, input_ids, attention_mask, pixel_values)
    if isinstance(latent, str):
        latent = (latent,)
    softcap = handle.final_logit_softcap if rule != "grad" else None
    capture = _Capture(model, latent, want_pre_logits=softcap is not None)
    params = [p for p in model.parameters() if p.requires_grad]
    forward_args = _forward_parameters(model)
    kwargs = {}
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
    else:
        kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
    if "use_cache" in forward_args:
        kwargs["use_cache"] = False
    positions = kept = None
    token_target = not callable(target) and input_ids is not None and "logits_to_keep" in forward_args
    if token_target:
        positions = _token_positions(target, input_ids, attention_mask, position)
        kept = torch.unique(positions)
        kwargs["logits_to_keep"] = kept
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            outputs = model(**kwargs)
            capture.frozen = True
            if callable(target) and not isinstance(target, Contrast):
                score = target(outputs)
                if not isinstance(score, torch.Tensor) or score.dim() > 1:
                    raise TypeError("a callable target must return a (B,) tensor or a scalar tensor")
                ids, parts, logits = None, None, getattr(outputs, "logits", None)
                score = score.reshape(-1)
            else:
                logits = getattr(outputs, "logits", None)
                if logits is None:
                    raise ValueError(f"{type(model).__name__} returns no logits: pass target as a callable "
                                     "f(outputs) -> (B,) (e.g. a similarity of pooled embeddings)")
                if positions is None and logits.dim() == 3:
                    positions = _token_positions(target, input_ids, attention_mask, position)
                score, ids, parts = _score(target, logits, positions, kept)
            inputs = [capture.embeds] + [capture.latent[k] for k in latent if k in capture.latent]
            missing = [k for k in latent if k not in capture.latent]
            if missing:
                raise ValueError(f"latent modules {missing} did not run in the forward pass")
            if softcap is not None and logits is not None and capture.pre_logits is not None:
                # identity rule on the final tanh: g(pre) = g(capped) * capped / pre
                (g_capped,) = torch.autograd.grad(score.sum(), logits, retain_graph=True)
                pre = capture.pre_logits
                ratio = torch.where(pre == 0, torch.ones_like(pre), logits / torch.where(pre == 0, 1.0, pre))
                grads = torch.autograd.grad(pre, inputs, grad_outputs=g_capped * ratio.detach(), allow_unused=True)
            else:
                grads = torch.autograd.grad(score.sum(), inputs, allow_unused=True)
    finally:
        for p in params:
            p.requires_grad_(True)
        capture.remove()
    rel = [(x.detach().float() * (g.float() if g is not None else 0.0)) for x, g in zip(inputs, grads)]
    return Explanation(
        relevance=rel[0].sum(-1),
        target_ids=ids,
        target_logit=score.detach().float(),
        rule=rule,
        latent={k: r for k, r in zip([k for k in latent], rel[1:])},
        positions=positions,
        target_logits=parts.detach().float() if parts is not None else None,
    )


def _forward_parameters(model):
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
