"""Deletion metrics for generations: RISE, MAS and RISE+AP (lower is better), from their definitions.

The prompt's eligible tokens are sorted by attribution, most relevant first (ties in a seeded random order), and
removed in k steps: P tokens make min(k, P) groups of P // k tokens, the first P % k groups one more. After
step i (i = 0 .. k, step 0 removing nothing) the model scores the generation:

  s_i   = log p(generation | prompt with groups 1..i removed): the sum over the generation's tokens of the
          log-softmax of the logit of each token at the position that predicted it.
  n_i   = the normalised response: clip((s_i - s_k) / |s_0 - s_k|, 0, 1), then the running minimum over i
          (a curve that never rises again once the generation has become unlikely).
  d_i   = the attribution density left: 1 - (positive attribution of the tokens removed by step i) / (positive
          attribution of all eligible tokens); a straight line from 1 to 0 when there is none. (The positive part:
          with signed weights, cancellation would move d outside [0, 1] and the penalty would measure how much a
          map cancels, not where its mass lies; the tokens go most relevant first, so d falls to 0 once the
          positive tokens are gone.)
  a_i   = |n_i - d_i|: the alignment penalty (the response falls where the attribution says it should, not just
          early).

  RISE    = AUC(n)                 (trapezoids over i / k from 0 to 1)
  RISE+AP = AUC(n + a)
  MAS     = AUC of clip(n + a, 0, 1) rescaled to [0, 1] by its min and max (a straight line from 1 to 0 when
            that is constant)

A faithful attribution makes the generation unlikely after few steps (small RISE) while its own mass goes with
it (small penalty). A row where removing everything changes nothing (s_0 = s_k) has no curve to judge: its
metrics are NaN and the means leave it out (counted as `degenerate`).
"""

import math

import torch

METRICS = ("rise", "mas", "rise_ap")


def group_sizes(n, steps):
    """Sizes of the min(steps, n) groups n tokens are removed in (the first n % k one larger)."""
    k = min(steps, n)
    if k == 0:
        return []
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def density(weights, sizes):
    """(len(sizes) + 1,) positive attribution left after each step; weights: the eligible tokens' attribution in
    removal order."""
    weights = torch.as_tensor(weights, dtype=torch.float64).clamp(min=0)
    total = float(weights.sum())
    k = len(sizes)
    if total <= 0:
        return torch.linspace(1.0, 0.0, k + 1, dtype=torch.float64)
    removed = torch.stack([w.sum() for w in weights.split(sizes)]).cumsum(0) if k else weights.new_zeros(0)
    return torch.cat([weights.new_ones(1), 1.0 - removed / total])


def auc(curve):
    """Trapezoids over x = i / (len - 1), i = 0 .. len - 1."""
    c = torch.as_tensor(curve, dtype=torch.float64)
    if c.numel() < 2:
        return float(c.sum())
    return float((c.sum() - (c[0] + c[-1]) / 2) / (c.numel() - 1))


def metrics(scores, dens):
    """RISE, MAS, RISE+AP and the curves of one row from its scores s_0 .. s_k and density d_0 .. d_k."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    d = torch.as_tensor(dens, dtype=torch.float64)
    span = abs(float(s[0] - s[-1]))
    if span == 0 or not math.isfinite(span):
        nan = float("nan")
        return {"rise": nan, "mas": nan, "rise_ap": nan, "normalized": [nan] * len(s), "density": d.tolist()}
    normalized = ((s - s[-1]) / span).clamp(0.0, 1.0).cummin(0).values
    penalty = (normalized - d).abs()
    corrected = (normalized + penalty).clamp(0.0, 1.0)
    low, high = float(corrected.min()), float(corrected.max())
    corrected = (corrected - low) / (high - low) if high > low else torch.linspace(1.0, 0.0, len(s),
                                                                                    dtype=torch.float64)
    return {"rise": auc(normalized), "mas": auc(corrected), "rise_ap": auc(normalized + penalty),
            "normalized": normalized.tolist(), "density": d.tolist()}


def summary(rows):
    """Means over rows of each metric (NaN rows left out), the per-row values and the number of degenerate rows."""
    out = {}
    for m in METRICS:
        values = [r[m] for r in rows]
        ok = [v for v in values if not math.isnan(v)]
        out[m] = sum(ok) / len(ok) if ok else float("nan")
        out[f"{m}_per_row"] = values
    out["degenerate"] = sum(math.isnan(r["rise"]) for r in rows)
    return out
