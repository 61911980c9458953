"""One layer's work in sequence chunks: af.low_memory(seq_chunk=C), af.explain(seq_chunk=C), --seq-chunk C.

Everything in a transformer layer but attention is per position, and attention needs all positions only through
its keys and values. So a layer runs over query chunks [a, b) of C positions: the layer's own code on the chunk's
hidden states (positions, rotary embeddings and masks sliced to the chunk), and its one attention call answered from
full-length K and V (the keys 0..b-1, queries aligned to the end of them: causal). Only K, V (and in the backward
their gradients) are full length; the rest is the chunk's working set.

  forward (no graph: the layer is checkpointed): chunk by chunk, the chunk's keys and values go into the full-length
      K, V and its queries attend to K[:b], V[:b]; the outputs fill the layer's output.
  backward, exact:
      A. K and V again, chunk by chunk, without a graph (each chunk's layer code runs up to its attention call, which
         takes the keys and values and stops it);
      B. per chunk, with a graph: the layer on the chunk, its attention over K[:b], V[:b] held as leaves; the
         chunk's output gradient back-propagated: the gradient of the chunk's input along every path but its own
         keys and values, and dK, dV accumulated over the chunks (the attention backward of each chunk is the exact
         whole-softmax gradient of its rows, rule factors included, and the rows' contributions to dK, dV sum);
      C. per chunk, the chunk's keys and values recomputed with a graph and dK, dV of its positions back-propagated
         to its input.
The explanation equals the unchunked one (tests: float64, every rule, GQA, windows, softcap, padding, a parallel
block). Layers this cannot run (not exactly one attention call through the engine, a cache, an N x M mask or position
bias, an input other than the hidden states that takes gradients, a per-position input it does not know) raise
UnsupportedModelError naming what.
"""

import inspect
import threading

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from attnlrp_fast.models.common import UnsupportedModelError

_STATE = threading.local()
_TENSOR = object()


class _Stop(Exception):
    """Raised by the attention call in capture mode: the chunk's keys and values are taken, the rest is not run."""


class _Chunk:
    """What the attention call of the layer being run needs to know: the chunk [a, b) of n positions, the mode
    ("write": forward, store the keys and values; "read": attend to the given K, V; "capture": take the keys and
    values and stop), the full-length K, V."""

    def __init__(self, n, mode, K=None, V=None):
        self.n, self.mode, self.K, self.V = n, mode, K, V
        self.a = self.b = 0
        self.calls = 0
        self.key = self.value = None

    def store(self, key, value):
        """The chunk's keys and values into the full-length K, V (made at the first chunk)."""
        if self.K is None:
            self.K = key.new_empty(key.shape[:2] + (self.n,) + key.shape[3:])
            self.V = value.new_empty(value.shape[:2] + (self.n,) + value.shape[3:])
        self.K[:, :, self.a:self.b] = key
        self.V[:, :, self.a:self.b] = value


def active():
    """The chunk being run on this thread, or None."""
    return getattr(_STATE, "chunk", None)


def attend(module, query, key, value, attention_mask, *, scale, window, softcap, sinks, rule, backend, is_causal,
           position_bias):
    """The layer's attention call while it runs on a chunk (bindings/hf.py attnlrp_fast_attention hands it here):
    (B, n_c, H, D) as the interface returns it."""
    from attnlrp_fast.bindings.attention import attention
    from attnlrp_fast.bindings.hf import mask_parts

    st = active()
    st.calls += 1
    name = type(module).__name__
    if st.calls > 1:
        raise UnsupportedModelError(f"{name}: a layer with more than one attention call cannot run in sequence "
                                    "chunks")
    if position_bias is not None or is_causal is False:
        raise UnsupportedModelError(f"{name}: sequence chunks take causal attention without a position bias")
    a, b = st.a, st.b
    if key.shape[2] != b - a or query.shape[2] != b - a:
        raise UnsupportedModelError(f"{name}: its keys cover {key.shape[2]} positions where the chunk has {b - a} "
                                    "(a cache, or keys of their own): it cannot run in sequence chunks")
    if st.mode == "capture":
        st.key, st.value = key, value
        raise _Stop
    if st.mode == "write":
        st.store(key, value)
    parts = mask_parts(attention_mask)
    if parts is None:
        raise UnsupportedModelError(f"{name}: a {attention_mask.dim()}-D mask cannot be cut into sequence chunks")
    kpm, segment_ids, key_limit = parts
    extra = {}
    if segment_ids is not None:
        extra["segment_ids"] = segment_ids[:, :b]
    if key_limit is not None:
        extra["key_limit"] = key_limit[:, a:b]
    out = attention(query, st.K[:, :, :b], st.V[:, :, :b], causal=True, scale=scale, window=window, softcap=softcap,
                    key_padding_mask=None if kpm is None else kpm[:, :b], rule=rule, backend=backend, sinks=sinks,
                    **extra)
    return out.transpose(1, 2).contiguous()


class _Running:
    """Sets the thread's chunk for a block, and attend() as the engine's attention hook (bindings/hf.py)."""

    def __init__(self, chunk):
        self.chunk = chunk

    def __enter__(self):
        from attnlrp_fast.bindings.hf import ATTENTION_HOOK

        self.saved, self.saved_hook = active(), getattr(ATTENTION_HOOK, "attend", None)
        _STATE.chunk = self.chunk
        ATTENTION_HOOK.attend = attend
        return self.chunk

    def __exit__(self, *exc):
        from attnlrp_fast.bindings.hf import ATTENTION_HOOK

        _STATE.chunk = self.saved
        ATTENTION_HOOK.attend = self.saved_hook
        return False


# per-position keyword inputs of decoder layers: how to take a chunk of each
def _slice_last(t, a, b):
    return t[..., a:b]


def _slice_rows(t, a, b):
    return t[..., a:b, :]


_PER_POSITION = {"position_ids": _slice_last, "cache_position": _slice_last, "position_embeddings": _slice_rows}
_PASSED = ("attention_mask",)   # the attention call takes its chunk itself


class LayerCall:
    """One call of a decoder layer, taken apart so that it can be run on chunks: `run(x_c, a, b)` runs the layer's
    own code on positions [a, b) (x_c: their hidden states)."""

    def __init__(self, inner, args, kwargs, n):
        self.inner, self.n = inner, n
        self.hidden_name = "hidden_states"
        if args:   # (GPT-2's blocks take their inputs by position): named by the layer's signature
            try:
                signature = inspect.signature(inner)
                bound = signature.bind(*args, **kwargs)
            except (TypeError, ValueError):
                raise UnsupportedModelError("a layer called with positional inputs that its signature does not "
                                            "name cannot run in sequence chunks") from None
            kinds = {k: p.kind for k, p in signature.parameters.items()}
            if inspect.Parameter.VAR_POSITIONAL in [kinds[k] for k in bound.arguments]:
                raise UnsupportedModelError("a layer that takes *args cannot run in sequence chunks")
            var_kw = next((k for k, kind in kinds.items() if kind == inspect.Parameter.VAR_KEYWORD), None)
            kwargs = {**{k: v for k, v in bound.arguments.items() if k != var_kw}, **bound.arguments.get(var_kw, {})}
            self.hidden_name = next(iter(bound.arguments))
        self.kwargs = {k: v for k, v in kwargs.items() if k != self.hidden_name}
        for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
            if self.kwargs.get(key) is not None:
                raise UnsupportedModelError("a layer with a KV cache cannot run in sequence chunks (explain runs "
                                            "without one)")
        for key, value in self.kwargs.items():
            if key in _PER_POSITION or key in _PASSED:
                continue
            for leaf in tree_flatten(value)[0]:
                if isinstance(leaf, torch.Tensor) and (leaf.requires_grad or n in leaf.shape[1:]):
                    raise UnsupportedModelError(f"the layer input {key!r} ({tuple(leaf.shape)}) is per position or "
                                                "takes gradients: the layer cannot run in sequence chunks")

    def run(self, x_c, a, b):
        kwargs = dict(self.kwargs)
        for key, cut in _PER_POSITION.items():
            if kwargs.get(key) is not None:
                leaves, spec = tree_flatten(kwargs[key])
                kwargs[key] = tree_unflatten([cut(t, a, b) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
                                              for t in leaves], spec)
        out = self.inner(**{self.hidden_name: x_c}, **kwargs)
        leaves, spec = tree_flatten(out)
        first = next((i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)), None)
        if first is None or leaves[first].shape[:2] != x_c.shape[:2] or \
                any(isinstance(t, torch.Tensor) for t in leaves[first + 1:]):
            raise UnsupportedModelError("a layer whose output is not its hidden states alone cannot run in sequence "
                                        "chunks")
        return leaves[first], (spec, [_TENSOR if i == first else t for i, t in enumerate(leaves)])


def _chunks(n, size):
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def forward(call, x, size, upto=None):
    """The layer's output over chunks of `size` positions (its first `upto` only: verify()), without a graph; the
    output structure to rebuild."""
    chunk = _Chunk(call.n, "write")
    y, shape = None, None
    with torch.no_grad(), _Running(chunk):
        for a, b in _chunks(call.n if upto is None else upto, size):
            chunk.a, chunk.b, chunk.calls = a, b, 0
            y_c, shape = call.run(x[:, a:b], a, b)
            _check_called(chunk)
            if y is None:
                y = y_c.new_empty((x.shape[0], call.n if upto is None else upto) + y_c.shape[2:])
            y[:, a:b] = y_c
    return y, shape


def _check_called(chunk):
    if chunk.calls != 1:
        raise UnsupportedModelError("a layer whose attention does not go through the engine (or that has none) "
                                    "cannot run in sequence chunks")


def _keys_values(call, x, size):
    """(K, V) of all positions, without a graph (phase A)."""
    chunk = _Chunk(call.n, "capture")
    with torch.no_grad(), _Running(chunk):
        for a, b in _chunks(call.n, size):
            chunk.a, chunk.b, chunk.calls = a, b, 0
            chunk.store(*_capture(call, x[:, a:b], a, b, chunk))
    return chunk.K, chunk.V


def _capture(call, x_c, a, b, chunk):
    try:
        call.run(x_c, a, b)
    except _Stop:
        return chunk.key, chunk.value
    raise UnsupportedModelError("a layer whose attention does not go through the engine cannot run in sequence "
                                "chunks")


def backward(call, x, dy, size, needs_grad):
    """The gradient of the layer's input (phases A, B, C of the module docstring); None when not needed."""
    if not needs_grad:
        return None
    K, V = _keys_values(call, x, size)
    K.requires_grad_(True)
    V.requires_grad_(True)
    dx = torch.zeros_like(x)
    chunk = _Chunk(call.n, "read", K, V)
    with _Running(chunk):
        for a, b in _chunks(call.n, size):                                   # B
            chunk.a, chunk.b, chunk.calls = a, b, 0
            x_c = x[:, a:b].detach().requires_grad_(True)
            with torch.enable_grad():
                y_c, _ = call.run(x_c, a, b)
            _check_called(chunk)
            if y_c.requires_grad:
                torch.autograd.backward(y_c, dy[:, a:b])
            if x_c.grad is not None:
                dx[:, a:b] += x_c.grad
    dK, dV = K.grad, V.grad
    del K, V
    if dK is None and dV is None:
        return dx
    capture = _Chunk(call.n, "capture")
    with _Running(capture):
        for a, b in _chunks(call.n, size):                                   # C
            capture.a, capture.b, capture.calls = a, b, 0
            x_c = x[:, a:b].detach().requires_grad_(True)
            with torch.enable_grad():
                key, value = _capture(call, x_c, a, b, capture)
            pairs = [(t, g[:, :, a:b]) for t, g in ((key, dK), (value, dV)) if g is not None and t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            if x_c.grad is not None:
                dx[:, a:b] += x_c.grad
    return dx


def check_layer(name, module, what="run in sequence chunks"):
    """UnsupportedModelError for a layer that is not transformers' decoder layer, or that holds a mixer along the
    sequence other than attention (a state-space, delta-rule or RWKV mixer, a convolution over positions): such a
    layer cannot `what` (sequence chunks here, shards of the sequence in context_parallel.py)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from attnlrp_fast.models.recurrent import is_recurrent

    if not isinstance(module, GradientCheckpointingLayer):
        raise UnsupportedModelError(f"{name} ({type(module).__name__}) is not a transformers decoder layer: it "
                                    f"cannot {what}")
    for sub_name, sub in module.named_modules():
        if is_recurrent(sub) or isinstance(sub, torch.nn.Conv1d):
            raise UnsupportedModelError(f"{name}.{sub_name} ({type(sub).__name__}) mixes positions other than by "
                                        f"attention: its layer cannot {what}")


def verify(call, x, size, name="the layer"):
    """UnsupportedModelError when the layer's output on its first min(N, 2 size) positions differs run in chunks of
    `size` from run as one chunk: it mixes positions other than by attention (a convolution or a recurrence in code
    of its own). The difference is taken relative to the layer's update (output - input). Nothing to compare with
    one chunk; on the meta device (af.estimate_memory) the two runs are made for their memory, not compared."""
    p = min(call.n, 2 * size)
    if p <= size:
        return
    whole, _ = forward(call, x, p, upto=p)
    parts, _ = forward(call, x, size, upto=p)
    if x.is_meta:
        return
    update = (whole.float() - x[:, :p].float()).norm()
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 2e-2
    if (parts.float() - whole.float()).norm() > tol * max(float(update), 1e-30):
        raise UnsupportedModelError(f"{name} mixes positions other than by attention (its output on the first {p} "
                                    f"positions changes when run in chunks of {size}): it cannot run in sequence "
                                    "chunks")


class SeqChunkedLayer(torch.autograd.Function):
    """A checkpointed layer run in sequence chunks (module docstring), its input kept on the device or stashed by
    an offloader (memory.py)."""

    @staticmethod
    def forward(ctx, call, size, offloader, index, x):
        ctx.call, ctx.size, ctx.offloader = call, size, offloader
        verify(call, x, size, f"layer {index}")
        if offloader is not None:
            ctx.stash = offloader.save(index, x)
        else:
            ctx.save_for_backward(x)
        y, call.shape = forward(call, x, size)
        return y

    @staticmethod
    def backward(ctx, dy):
        x = ctx.offloader.load(ctx.stash) if ctx.offloader is not None else ctx.saved_tensors[0]
        return None, None, None, None, backward(ctx.call, x.detach(), dy, ctx.size, ctx.needs_input_grad[4])


def run_layer(inner, args, kwargs, size, offloader=None, index=0, layer=None):
    """inner(*args, **kwargs) (a decoder layer's forward) through SeqChunkedLayer; its output as inner returns it.
    layer: (name, module) of the layer (checked: transformers' decoder layer, no recurrent mixer inside)."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise UnsupportedModelError("a layer without (B, N, hidden) hidden states cannot run in sequence chunks")
    if layer is not None:
        check_layer(*layer)
    call = LayerCall(inner, args, kwargs, x.shape[1])
    y = SeqChunkedLayer.apply(call, size, offloader, index, x)
    spec, leaves = call.shape
    return tree_unflatten([y if t is _TENSOR else t for t in leaves], spec)
