"""What an explanation explains: target resolution, written once (explain() and the evaluation use it).

A target is None (the argmax at the target position; classification heads: the argmax class), an int token or
class id, a (B,) tensor of ids, a list of (position, token_id) pairs (the sum of their logits), contrast(a, b)
(logit(a) - logit(b)), or a callable f(model_outputs) -> (B,) (any scalar of the output). The position an
int/None/contrast target reads is each row's last real token unless given.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Contrast:
    """Target "logit of `this` minus logit of `that`" (tokens at the target position, or classes)."""

    this: int
    that: int


def contrast(this: int, that: int) -> Contrast:
    """A contrastive target for explain(): why `this` rather than `that`."""
    return Contrast(int(this), int(that))


def target_rows(input_ids, attention_mask, position, n):
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


def token_positions(target, input_ids, attention_mask, position):
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
    return target_rows(input_ids, attention_mask, position, n)[:, None]


def score(target, logits, positions, kept):
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
        if not ids.is_meta and ((ids < 0).any() or (ids >= vocab).any()):
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


@dataclass(frozen=True)
class Neuron:
    """Target "activation of neuron(s) `index` of latent `latent`" (a module output, or 'name:input' for its input,
    as latent= names them), at `position` or summed over the real positions (position=None)."""

    latent: str
    index: tuple
    position: object = None   # None: summed over the real positions; "last": each row's last real token; an int

    def positions(self, input_ids, attention_mask, n):
        """(B, N) float weights of the positions the target sums over (1 where read, else 0)."""
        B = input_ids.shape[0]
        if self.position is None:
            if attention_mask is None:
                return torch.ones(B, n, device=input_ids.device)
            return attention_mask.to(device=input_ids.device, dtype=torch.float32)
        rows = target_rows(input_ids, attention_mask, None if self.position == "last" else self.position, n)
        return torch.nn.functional.one_hot(rows, n).float()

    def read(self, value, input_ids, attention_mask):
        """The target score (B,) from the latent's value (B, N, F)."""
        if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[0] != input_ids.shape[0]:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"neuron target: latent {self.latent!r} is {shape}, not (batch, positions, features) "
                             f"for the {tuple(input_ids.shape)} input")
        n, width = value.shape[1], value.shape[2]
        bad = [i for i in self.index if not -width <= i < width]
        if bad:
            raise ValueError(f"neuron {bad[0]} is outside latent {self.latent!r}'s {width} features")
        if n != input_ids.shape[1]:
            raise ValueError(f"neuron target: latent {self.latent!r} has {n} positions, the input {input_ids.shape[1]}")
        weights = self.positions(input_ids, attention_mask, n).to(value.dtype)
        picked = value[..., list(self.index)].sum(-1)                       # (B, N)
        return (picked * weights).sum(-1)


def neuron(latent: str, index, position=None) -> Neuron:
    """A target for explain(): the activation of neuron `index` (an int, or several: their sum) of latent `latent`
    ('module.name' for its output, 'module.name:input' for its input; an MLP's neurons as its down projection reads
    them: 'model.layers.3.mlp.down_proj:input'), at `position` (an int; "last": each row's last real token) or
    summed over the real positions (None)."""
    if not isinstance(latent, str) or not latent:
        raise TypeError("neuron(latent, index): latent is a module name such as 'model.layers.3.mlp.down_proj:input'")
    idx = (index,) if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0) else index
    try:
        idx = tuple(int(i) for i in idx)
    except (TypeError, ValueError):
        raise TypeError(f"neuron index must be an int or a sequence of ints, got {index!r}") from None
    if not idx:
        raise ValueError("neuron(): no neuron index given")
    if position is not None and position != "last" and not isinstance(position, int):
        raise TypeError(f"neuron position must be an int, 'last' or None (summed over positions), got {position!r}")
    return Neuron(latent, idx, position)


def latent_hint(spec):
    """Why a latent may not have run (for error messages): the engine computes an MLP's activation inside its fused
    MLP op, so an activation module's hooks do not fire under it."""
    name = spec.partition(":")[0]
    parent, _, leaf = name.rpartition(".")
    if "act" in leaf.lower():
        return (f" (under the explanation engine an MLP's activation runs fused inside it: name its neurons as the "
                f"down projection reads them, e.g. '{parent}.down_proj:input', or with the MLP's own name for its "
                "down projection)")
    return ""
