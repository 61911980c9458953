"""Hidden neurons: explain one (af.neuron as a target), switch neurons while the model runs (af.intervene), read what
a neuron writes onto the vocabulary (af.neuron_vocabulary) and find the texts that make it fire (af.top_activating).

A neuron is feature `index` of a latent, named as explain()'s latent= names them: "module.name" (its output) or
"module.name:input" (its input). An MLP's neurons are best named as its down projection reads them,
"model.layers.17.mlp.down_proj:input": act(gate) * up for a gated MLP, act(fc1 x) for a plain one. That module runs
under the explanation engine too; an MLP's activation module itself (mlp.act_fn) does not, since the engine computes
the activation inside its fused MLP op (a latent that did not run is an error, never a silent no-op).

    e = af.explain(model, ids, target=af.neuron("model.layers.1.mlp.down_proj:input", 37, position=-1))
    with af.intervene(model, {"model.layers.1.mlp.down_proj:input": {37: 0.0, 12: af.scale(2.0)}}):
        out = model.generate(ids)            # or model(ids), af.explain(model, ids)
    v = af.neuron_vocabulary(model, "model.layers.1.mlp.down_proj:input", 37, k=10, tokenizer=tok)
    windows = af.top_activating(model, tok, "model.layers.1.mlp.down_proj:input", 37, texts, k=5, window=32)

Edits (af.intervene): a number sets the neuron to it; af.scale(f) multiplies it by f; af.add(v) adds v; af.set_to(v)
is the explicit form of a number. Each takes positions= (absolute token positions; negative ones count from the end
of each forward call's input, so -1 is the newest token at every step of generate) or applies everywhere (None).
"""

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from attnlrp_fast.lrp_patch import unwrap
from attnlrp_fast.patching import hooks_are_paused
from attnlrp_fast.targets import latent_hint


# --- edits -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """What an intervention does to a neuron: op "set" | "scale" | "add" with `value`, at `positions` (None: all)."""

    op: str
    value: float
    positions: Optional[tuple] = None

    def __post_init__(self):
        if self.op not in ("set", "scale", "add"):
            raise ValueError(f"edit op must be 'set', 'scale' or 'add', got {self.op!r}")
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool):
            raise TypeError(f"an edit's value must be a number, got {self.value!r}")
        if self.value != self.value or self.value in (float("inf"), float("-inf")):
            raise ValueError(f"an edit's value must be finite, got {self.value!r}")


def _positions(positions):
    if positions is None:
        return None
    if isinstance(positions, int):
        return (positions,)
    try:
        out = tuple(int(p) for p in positions)
    except (TypeError, ValueError):
        raise TypeError(f"positions must be an int, a sequence of ints or None, got {positions!r}") from None
    if not out:
        raise ValueError("positions=(): no position given (None applies the edit everywhere)")
    return out


def set_to(value, positions=None) -> Edit:
    """Set the neuron to `value` (at `positions`, default everywhere)."""
    return Edit("set", float(value), _positions(positions))


def scale(factor, positions=None) -> Edit:
    """Multiply the neuron by `factor` (0 switches it off)."""
    return Edit("scale", float(factor), _positions(positions))


def add(value, positions=None) -> Edit:
    """Add `value` to the neuron."""
    return Edit("add", float(value), _positions(positions))


def _as_edit(edit):
    if isinstance(edit, Edit):
        return edit
    if isinstance(edit, (int, float)) and not isinstance(edit, bool):
        return set_to(edit)
    raise TypeError(f"an intervention is a number (set the neuron to it) or af.set_to / af.scale / af.add, "
                    f"got {edit!r}")


def _as_neurons(key):
    if isinstance(key, int) and not isinstance(key, bool):
        return (key,)
    if isinstance(key, (tuple, range)) and key and all(isinstance(k, int) for k in key):
        return tuple(key)
    raise TypeError(f"a neuron is an int index (or a tuple of them), got {key!r}")


# --- intervene ---------------------------------------------------------------------------------------------------
class _Site:
    """One latent's edits as a hook: the module, where (output / input), and [(neurons, Edit)]."""

    def __init__(self, model, spec, edits):
        name, _, where = spec.partition(":")
        if where not in ("", "input"):
            raise ValueError(f"latent {spec!r}: use 'module.name' or 'module.name:input'")
        try:
            self.module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"intervene: the model has no module named {name!r}") from None
        if not isinstance(edits, dict) or not edits:
            raise TypeError(f"intervene: latent {spec!r} takes a dict {{neuron: value | af.scale(f) | af.add(v)}}")
        self.spec, self.on_input = spec, where == "input"
        self.edits = [(_as_neurons(k), _as_edit(v)) for k, v in edits.items()]
        self.fired = 0

    def apply(self, x, offset, total):
        """x (..., N, F) with the edits applied (a new tensor; x is left as it is)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"intervene: latent {self.spec!r} is {type(x).__name__}, not a float tensor")
        width = x.shape[-1]
        y = x.clone()
        for neurons, e in self.edits:
            bad = [i for i in neurons if not -width <= i < width]
            if bad:
                raise ValueError(f"intervene: neuron {bad[0]} is outside latent {self.spec!r}'s {width} features")
            cols = list(neurons)
            if e.positions is None:
                where = (..., cols)
            else:
                if x.dim() < 2:
                    raise ValueError(f"intervene: latent {self.spec!r} has no position dimension ({tuple(x.shape)})")
                n = x.shape[-2]
                if n != total - offset:
                    raise ValueError(f"intervene: latent {self.spec!r} holds {n} positions of a {total - offset}-token "
                                     "call (sequence chunks?): position edits need whole sequences; edits without "
                                     "positions= apply anyway")
                rows = [(p if p >= 0 else total + p) - offset for p in e.positions]
                rows = [r for r in rows if 0 <= r < n]
                if not rows:
                    continue
                where = (..., torch.tensor(rows, device=x.device)[:, None], cols)
            part = y[where]
            if e.op == "set":
                y[where] = torch.full_like(part, e.value)
            elif e.op == "scale":
                y[where] = part * e.value
            else:
                y[where] = part + e.value
        return y


class InterventionHandle:
    """What af.intervene returns: `.sites` (latent -> number of forward calls it edited in the last model call)."""

    def __init__(self, model, sites):
        self.model, self._sites, self._handles = model, sites, []
        self._offset = self._total = 0

    @property
    def sites(self):
        return {s.spec: s.fired for s in self._sites}

    def _start(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        n = ids.shape[-1] if isinstance(ids, torch.Tensor) else (emb.shape[1] if isinstance(emb, torch.Tensor) else 0)
        cache_position = kwargs.get("cache_position")
        past = kwargs.get("past_key_values")
        if isinstance(cache_position, torch.Tensor) and cache_position.numel():
            offset = int(cache_position.reshape(-1)[0])
        elif past is not None and hasattr(past, "get_seq_length"):
            offset = int(past.get_seq_length())
        else:
            offset = 0
        self._offset, self._total = offset, offset + n
        for s in self._sites:
            s.fired = 0

    def _end(self, module, args, kwargs, output):
        silent = [s.spec for s in self._sites if s.fired == 0]
        if silent:
            raise RuntimeError(f"intervene: latent {silent[0]!r} did not run in this forward pass, so its edits were not "
                               f"applied{latent_hint(silent[0])}")

    def _hook(self, site):
        if site.on_input:
            def pre(module, args, kwargs):
                if hooks_are_paused():
                    return None
                site.fired += 1
                if args:
                    return (site.apply(args[0], self._offset, self._total),) + tuple(args[1:]), kwargs
                key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
                if key is None:
                    raise RuntimeError(f"intervene: {site.spec!r} was called without a tensor input")
                return args, {**kwargs, key: site.apply(kwargs[key], self._offset, self._total)}
            return site.module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(module, args, output):
            if hooks_are_paused():
                return None
            site.fired += 1
            if isinstance(output, tuple):
                return (site.apply(output[0], self._offset, self._total),) + output[1:]
            return site.apply(output, self._offset, self._total)
        return site.module.register_forward_hook(post)

    def _open(self):
        self._handles.append(self.model.register_forward_pre_hook(self._start, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end, with_kwargs=True))
        for s in self._sites:
            self._handles.append(self._hook(s))

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def intervene(model, edits):
    """Switch neurons while the model runs: edits = {latent: {neuron: value | af.set_to(v) | af.scale(f) |
    af.add(v)}}, a neuron an int (or a tuple of ints, edited alike). For the model's forward, generate and explain
    alike, inside the `with`; hooks only (no weight is touched), removed on exit, so the model is as it was."""
    model = unwrap(model)
    if not isinstance(edits, dict) or not edits:
        raise TypeError("intervene(model, edits): edits is a dict {latent: {neuron: value}}")
    handle = InterventionHandle(model, [_Site(model, spec, e) for spec, e in edits.items()])
    handle._open()
    try:
        yield handle
    finally:
        handle.close()


# --- read a neuron: its vocabulary -------------------------------------------------------------------------------
@dataclass
class NeuronVocabulary:
    """What neuron `neuron` of `latent` writes onto the vocabulary: the tokens whose logits one unit of it raises most
    (top) and lowers most (bottom), with that change in logits; `tokens` decoded when a tokenizer was given."""

    latent: str
    neuron: int
    top_ids: list
    top_scores: list
    bottom_ids: list
    bottom_scores: list
    top_tokens: Optional[list] = None
    bottom_tokens: Optional[list] = None
    down_projection: str = ""


def _linear_io(module):
    """(in, out) of an nn.Linear or transformers' Conv1D (GPT-2), else None."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if isinstance(module, torch.nn.Linear):
        return w.shape[1], w.shape[0]
    if type(module).__name__ == "Conv1D":
        return w.shape[0], w.shape[1]
    return None


def _write_column(module, j):
    """The column of output the j-th input feature of a linear layer writes (float32)."""
    w = module.weight.detach().float()
    return w[j] if type(module).__name__ == "Conv1D" else w[:, j]


def down_projection(model, latent):
    """(name, module) of the linear layer that writes latent's neurons into the residual stream: the module itself
    for 'name:input' of a linear layer with the model's hidden size as output, else the one linear child of the
    latent's parent module with that output (an MLP's down projection)."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head): a neuron's vocabulary needs one")
    hidden = head.weight.shape[1]
    name, _, where = latent.partition(":")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"latent {latent!r}: the model has no module named {name!r}") from None
    io = _linear_io(module)
    if where == "input" and io is not None and io[1] == hidden:
        return name, module
    parent = name.rpartition(".")[0]
    owner = model.get_submodule(parent) if parent else model
    found = [(f"{parent}.{n}" if parent else n, m) for n, m in owner.named_children()
             if m is not module and (_linear_io(m) or (0, 0))[1] == hidden and (_linear_io(m) or (0, 0))[0] != hidden]
    if len(found) != 1:
        raise ValueError(f"latent {latent!r}: no single down projection found beside it (one linear layer in "
                         f"{parent or type(model).__name__} writing the model's {hidden} hidden features); "
                         "neuron_vocabulary reads MLP neurons, e.g. 'model.layers.3.mlp.down_proj:input'")
    return found[0]


def mlp_latents(model):
    """Every transformer layer's MLP neurons, as their down projection reads them ('<layer>.<mlp>.<down>:input'),
    in layer order: in each layer the first linear layer inside a module named like an MLP (mlp, feed_forward, ffn)
    whose output is the model's hidden size and whose input is not."""
    from attnlrp_fast.memory import transformer_layers

    model = unwrap(model)
    head = model.get_output_embeddings()
    hidden = head.weight.shape[1] if head is not None and getattr(head, "weight", None) is not None else \
        getattr(model.config, "hidden_size", None)
    out = []
    for name, layer in transformer_layers(model):
        for sub, m in layer.named_modules():
            io = _linear_io(m)
            inside = any(k in sub.lower() for k in ("mlp", "feed_forward", "ffn"))
            if io is not None and inside and io[1] == hidden and io[0] != hidden:
                out.append(f"{name}.{sub}:input")
                break
    return out


def _final_norm_gain(model, hidden):
    """(gain (hidden,), centred) of the model's final norm, the last norm outside its layers; (ones, False) if none.
    Its normalising scale is a positive number per position, which ranks tokens alike and is left out."""
    last = None
    for name, m in model.named_modules():
        if type(m).__name__.endswith("Norm") and not any(p.isdigit() for p in name.split(".")):
            last = m
    if last is None:
        return torch.ones(hidden), False
    w = getattr(last, "weight", None)
    gain = torch.ones(hidden) if w is None else w.detach().float().cpu()
    if type(last).__name__.startswith("Gemma"):   # Gemma's RMSNorm scales by (1 + weight)
        gain = 1.0 + gain
    return gain, "LayerNorm" in type(last).__name__


def neuron_vocabulary(model, latent, neuron, k=10, tokenizer=None) -> NeuronVocabulary:
    """The tokens neuron `neuron` of `latent` promotes and suppresses: its down-projection column (what one unit of
    it adds to the residual stream), through the final norm's gain (centred for a LayerNorm) onto the unembedding
    (logit lens: the layers after it are left out). Top and bottom `k` tokens with their logit change per unit."""
    model = unwrap(model)
    name, down = down_projection(model, latent)
    width = _linear_io(down)[0]
    if not isinstance(neuron, int) or not -width <= neuron < width:
        raise ValueError(f"neuron {neuron!r} is outside latent {latent!r}'s {width} features")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    head = model.get_output_embeddings().weight.detach().float().cpu()
    d = _write_column(down, neuron).cpu()
    gain, centred = _final_norm_gain(model, d.numel())
    if centred:
        d = d - d.mean()
    scores = head @ (gain * d)
    k = min(k, scores.numel())
    top = scores.topk(k)
    bottom = (-scores).topk(k)
    out = NeuronVocabulary(latent, neuron, top.indices.tolist(), top.values.tolist(), bottom.indices.tolist(),
                           (-bottom.values).tolist(), down_projection=name)
    if tokenizer is not None:
        out.top_tokens = [tokenizer.decode([i]) for i in out.top_ids]
        out.bottom_tokens = [tokenizer.decode([i]) for i in out.bottom_ids]
    return out


# --- read a neuron: the texts that make it fire ------------------------------------------------------------------
@dataclass
class ActivatingWindow:
    """One of the windows where a neuron fires most (af.top_activating)."""

    activation: float              # the neuron's activation at `position` in the whole text (piece)
    text_index: int                # which text of the corpus
    position: int                  # the token position in that text
    input_ids: torch.Tensor        # (1, w) the window's tokens, ending at (or centred on) the position
    tokens: list                   # the window's tokens, decoded one by one
    target: int                    # the position in the window explained
    text: str = ""                 # the window decoded
    relevance: Optional[torch.Tensor] = None   # (w,) AttnLRP relevance of the window's tokens for the activation
    window_activation: Optional[float] = None  # the activation on the window alone (what was explained)


def _pieces(tokenizer, texts, max_length):
    """(text index, start, ids) for every text split into pieces of at most max_length tokens."""
    out = []
    for t, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"top_activating: text {t} is {type(text).__name__}, not str")
        if not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for s in range(0, len(ids), max_length):
            if ids[s:s + max_length]:
                out.append((t, s, ids[s:s + max_length]))
    return out


def _causal(model):
    return bool(getattr(model, "can_generate", lambda: False)()) and not getattr(model.config, "is_encoder_decoder",
                                                                                  False)


def top_activating(model, tokenizer, latent, neuron, texts, k=10, window=32, *, batch_size=8, max_length=512,
                   distinct=True, explain=True, rule="attnlrp", backend=None, progress=True):
    """Stream `texts` through the model in batches (a progress bar unless progress=False), keep the `k` positions
    where neuron `neuron` of `latent` fires most (distinct=True: one per text piece, its strongest), and return each
    as an ActivatingWindow: `window` tokens ending at it (centred on it for an encoder), with (explain=True) the
    AttnLRP explanation of the neuron's activation there (af.explain with target=af.neuron(latent, neuron,
    position)). Texts longer than max_length tokens are read in pieces of that many."""
    from attnlrp_fast.explanation import explain as _explain
    from attnlrp_fast.inputs import model_device
    from attnlrp_fast.targets import neuron as _neuron

    model = unwrap(model)
    texts = [texts] if isinstance(texts, str) else list(texts)
    for what, v in (("k", k), ("window", window), ("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"top_activating: {what} must be a positive int, got {v!r}")
    pieces = _pieces(tokenizer, texts, max_length)
    if not pieces:
        raise ValueError("top_activating: the corpus holds no text")
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    spec, where = latent, latent.partition(":")[2]
    name = latent.partition(":")[0]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"latent {latent!r}: the model has no module named {name!r}") from None
    seen = {}

    def keep(mod, *args):
        value = args[0][0] if where == "input" else args[1]
        seen["value"] = value[0] if isinstance(value, (tuple, list)) else value

    hook = module.register_forward_pre_hook(keep) if where == "input" else module.register_forward_hook(keep)
    best = []   # (activation, text index, start, row position, ids)
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(pieces), desc=f"neuron {neuron}: reading the corpus", unit="piece", disable=not progress,
                   leave=False)
        with torch.no_grad():
            for b in range(0, len(pieces), batch_size):
                chunk = pieces[b:b + batch_size]
                n = max(len(ids) for _, _, ids in chunk)
                ids = torch.full((len(chunk), n), pad, dtype=torch.long)
                mask = torch.zeros(len(chunk), n, dtype=torch.long)
                for r, (_, _, p) in enumerate(chunk):
                    ids[r, :len(p)] = torch.tensor(p)
                    mask[r, :len(p)] = 1
                seen.clear()
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
                value = seen.get("value")
                if value is None:
                    raise ValueError(f"latent {latent!r} did not run in the forward pass")
                if value.dim() != 3 or value.shape[:2] != ids.shape:
                    raise ValueError(f"latent {latent!r} is {tuple(value.shape)}, not (batch, positions, features)")
                if not -value.shape[-1] <= neuron < value.shape[-1]:
                    raise ValueError(f"neuron {neuron} is outside latent {latent!r}'s {value.shape[-1]} features")
                act = value[..., neuron].float().cpu().masked_fill(mask == 0, float("-inf"))
                if distinct:
                    v, p = act.max(-1)
                    hits = [(float(v[r]), r, int(p[r])) for r in range(len(chunk))]
                else:
                    top = act.flatten().topk(min(k, int(mask.sum())))
                    hits = [(v, *divmod(f, n)) for v, f in zip(top.values.tolist(), top.indices.tolist())]
                for v, r, p in hits:
                    best.append((v, chunk[r][0], chunk[r][1], p, chunk[r][2]))
                best = sorted(best, key=lambda x: -x[0])[:k]
                bar.update(len(chunk))
        bar.close()
    finally:
        hook.remove()
    out, causal = [], _causal(model)
    for v, t, start, p, piece in best:
        lo = max(0, p - window + 1) if causal else max(0, min(p - window // 2, len(piece) - window))
        w_ids = torch.tensor(piece[lo:lo + window] if not causal else piece[lo:p + 1])[None]
        win = ActivatingWindow(v, t, start + p, w_ids, [tokenizer.decode([i]) for i in w_ids[0].tolist()], p - lo,
                               tokenizer.decode(w_ids[0].tolist()))
        if explain:
            e = _explain(model, input_ids=w_ids.to(device), target=_neuron(spec, neuron, position=p - lo), rule=rule,
                         backend=backend)
            win.relevance, win.window_activation = e.relevance[0].cpu(), float(e.target_logit[0])
        out.append(win)
    return out
