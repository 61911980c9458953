"""af.low_memory(model): keep the memory of an explanation (or any forward + backward) linear in the sequence
length and small in its constant.

    with af.low_memory(model, mlp_chunk=1024):
        ...                                   # forward + backward as usual

On this instance only, restored on exit:
- each transformer layer is activation-checkpointed (torch.utils.checkpoint, non-reentrant): the forward keeps
  only each layer's input, and the backward recomputes one layer at a time;
- each layer's position-wise MLP runs in sequence chunks of `mlp_chunk` tokens, each chunk checkpointed again,
  so its (N x intermediate) activations never exist at once, not even while a layer is recomputed.

Attention needs no chunking: the engine holds O(N) per head already. Together with explain() computing logits
only where the target reads them and parameters not requiring gradients, what remains is O(N * hidden) per
layer for the saved layer inputs plus one layer's O(N * hidden) working set.

`progress(event)` (optional) is called with "forward" after each layer's forward and with "backward" when the
gradient of a layer's input is complete, for progress bars.

With offload="cpu" the layers' saved inputs (what the checkpoints keep: B x N x hidden per layer) live in host
memory (pinned, on a GPU) instead of on the device: each layer's forward copies its input to the host on a side
stream and lets the device copy go; the backward of layer l brings its input back (prefetched while layer l + 1's
backward ran) and starts bringing layer l - 1's on the side stream, so that the copy overlaps layer l's backward
(_Offloader). Nothing else changes: the recomputation and the gradients are those of the checkpointed layer. On the
CPU (host == device) the same path runs with copies in place of transfers; `handle.copies` records each copy
("to host" | "to device", layer index) in order. On the meta device (af.estimate_memory) the host copies are
counted as host bytes (`handle.host_peak`), not as device memory.
"""

import contextlib
import weakref

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint as _checkpoint

from attnlrp_fast.patching import Patches

OFFLOAD_TARGETS = (None, "cpu")
OFFLOAD_ATTR = "_attnlrp_fast_offload"   # set on a model inside low_memory(offload=...): where its stash goes
_TENSOR = object()   # a tensor's place among a layer's outputs (_offloaded)

# Attribute names under which HF layers keep their position-wise MLP (or mixture of experts).
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")


def transformer_layers(model):
    """(name, module) of the model's transformer layers, in order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()
    found = [(n, m) for n, m in model.named_modules() if GradientCheckpointingLayer and
             isinstance(m, GradientCheckpointingLayer)]
    if found:
        return found
    # fallback: the children of the longest ModuleList
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    name, longest = max(lists, key=lambda item: len(item[1]))
    return [(f"{name}.{i}", m) for i, m in enumerate(longest)]


def _hidden_input(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


class _Stash:
    """One layer's saved input: its host copy (and the event that says the copy is done), its shape, and the device
    copy brought back ahead of its backward (with its event)."""

    def __init__(self, index, x):
        self.index, self.shape, self.dtype, self.device = index, x.shape, x.dtype, x.device
        self.nbytes = x.numel() * x.element_size()
        self.host = self.host_done = self.fetched = self.fetched_done = None


_METERS = []   # offload_meter()'s lists


@contextlib.contextmanager
def offload_meter():
    """A list of the offloaders created inside the block (af.estimate_memory reads their host bytes)."""
    found = []
    _METERS.append(found)
    try:
        yield found
    finally:
        _METERS.remove(found)


class _Offloader:
    """The saved layer inputs of one low_memory handle, in host memory (module docstring)."""

    def __init__(self):
        for meter in _METERS:
            meter.append(self)
        self.copies = []                               # ("to host" | "to device", layer index), in order
        self.host_bytes = self.host_peak = 0
        self._stashes = weakref.WeakValueDictionary()  # layer index -> its stash (alive while the graph holds it)
        self._stream = None

    def _side_stream(self, device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def save(self, index, x):
        """A stash holding `x` (a layer's input) in host memory; the device copy is the caller's to let go."""
        stash = _Stash(index, x)
        if x.is_cuda:
            stream = self._side_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                stash.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                stash.host.copy_(x, non_blocking=True)
                x.record_stream(stream)              # its memory is not reused before the copy is done
                stash.host_done = stream.record_event()
        elif not x.is_meta:
            stash.host = x.detach().clone()
        self.copies.append(("to host", index))
        self.host_bytes += stash.nbytes
        self.host_peak = max(self.host_peak, self.host_bytes)
        weakref.finalize(stash, self._released, stash.nbytes)
        self._stashes[index] = stash
        return stash

    def _released(self, nbytes):
        self.host_bytes -= nbytes

    def _fetch(self, stash):
        """Start bringing the stash back to its device (on the side stream on a GPU)."""
        if stash.fetched is not None:
            return
        if stash.device.type == "meta":
            stash.fetched = torch.empty(stash.shape, dtype=stash.dtype, device="meta")
        elif stash.device.type == "cuda":
            stream = self._side_stream(stash.device)
            with torch.cuda.stream(stream):
                stream.wait_event(stash.host_done)
                stash.fetched = stash.host.to(stash.device, non_blocking=True)
                stash.fetched_done = stream.record_event()
        else:
            stash.fetched = stash.host.clone()
        self.copies.append(("to device", stash.index))

    def load(self, stash):
        """The stash's tensor on its device for its layer's backward; starts bringing back the layer before it."""
        self._fetch(stash)
        x, stash.fetched = stash.fetched, None
        if stash.fetched_done is not None:
            current = torch.cuda.current_stream(stash.device)
            current.wait_event(stash.fetched_done)
            x.record_stream(current)
            stash.fetched_done = None
        previous = self._stashes.get(stash.index - 1)
        if previous is not None:
            self._fetch(previous)
        return x


class _OffloadedLayer(torch.autograd.Function):
    """A layer checkpointed with its input in host memory: the forward runs without a graph and stashes the input;
    the backward brings it back, recomputes the layer with a graph and back-propagates through it (the other
    inputs that take gradients, such as a decoder's encoder states, are saved as they are)."""

    @staticmethod
    def forward(ctx, run, offloader, index, x, *others):
        ctx.run, ctx.offloader = run, offloader
        ctx.stash = offloader.save(index, x)
        ctx.save_for_backward(*others)
        with torch.no_grad():
            out = run(x, *others)
        return tuple(leaf for leaf in tree_flatten(out)[0] if isinstance(leaf, torch.Tensor))

    @staticmethod
    def backward(ctx, *grads):
        x = ctx.offloader.load(ctx.stash).detach().requires_grad_(ctx.needs_input_grad[3])
        others = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[4:])]
        with torch.enable_grad():
            out = ctx.run(x, *others)
        outs = [leaf for leaf in tree_flatten(out)[0] if isinstance(leaf, torch.Tensor)]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, x.grad if x.requires_grad else None,
                *[t.grad if t.requires_grad else None for t in others])


def _offloaded(inner, offloader, index, args, kwargs):
    """inner(*args, **kwargs) through _OffloadedLayer: the hidden states (the first tensor) stashed, the other
    tensors that take gradients passed as its inputs, the rest closed over; its output rebuilt as inner returns it."""
    leaves, spec = tree_flatten((args, kwargs))
    first = next(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    moving = [i for i, leaf in enumerate(leaves) if i != first and isinstance(leaf, torch.Tensor) and
              leaf.requires_grad]
    shape = {}
    x = leaves[first]
    leaves[first] = None   # the closure below must not keep the device copy alive: it is stashed
    inputs = [leaves[i] for i in moving]
    for i in moving:
        leaves[i] = None   # (saved by the function, as its inputs)

    def run(x, *others):
        filled = list(leaves)
        filled[first] = x
        for i, t in zip(moving, others):
            filled[i] = t
        a, kw = tree_unflatten(filled, spec)
        out = inner(*a, **kw)
        if not shape:
            out_leaves, shape["spec"] = tree_flatten(out)
            shape["fixed"] = [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in out_leaves]
        return out

    tensors = iter(_OffloadedLayer.apply(run, offloader, index, x, *inputs))
    del x, inputs
    return tree_unflatten([next(tensors) if leaf is _TENSOR else leaf for leaf in shape["fixed"]], shape["spec"])


def _without_empty_caches(kwargs):
    """kwargs with an empty KV cache passed to a layer taken out (None): a checkpointed layer runs twice, and a cache
    it updates would hold its keys twice on the recomputation (XLM makes one even with use_cache=False); an empty
    cache gives a layer nothing a fresh one would not."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - without transformers there are no caches
        return kwargs
    empty = [k for k, v in kwargs.items() if isinstance(v, Cache) and _length(v) == 0]
    return {**kwargs, **{k: None for k in empty}} if empty else kwargs


def _length(cache):
    """The cache's length (-1 where it cannot say: a cache of linear-attention layers only)."""
    try:
        return cache.get_seq_length()
    except (ValueError, NotImplementedError):
        return -1


def check_offload_options(offload, seq_chunk):
    """ValueError for an offload target or a sequence chunk size low_memory does not take (af.estimate_memory checks
    its own with this too)."""
    if offload not in OFFLOAD_TARGETS:
        raise ValueError(f"offload must be one of {OFFLOAD_TARGETS}, got {offload!r}")
    if seq_chunk is not None and (not isinstance(seq_chunk, int) or isinstance(seq_chunk, bool) or seq_chunk < 1):
        raise ValueError(f"seq_chunk must be a positive number of tokens or None, got {seq_chunk!r}")


class LowMemoryHandle:
    """The patches low_memory() applied; remove() (or leaving the with-block) undoes them."""

    def __init__(self, model, *, checkpoint=True, mlp_chunk=1024, progress=None, offload=None, seq_chunk=None):
        if mlp_chunk is not None and (not isinstance(mlp_chunk, int) or mlp_chunk < 0):
            raise ValueError(f"mlp_chunk must be a positive number of tokens, 0 or None (no chunking), got {mlp_chunk!r}")
        check_offload_options(offload, seq_chunk)
        if offload is not None and not checkpoint:
            raise ValueError("offload='cpu' moves the layers' checkpoints to the host: it needs checkpoint=True")
        if seq_chunk is not None and not checkpoint:
            raise ValueError("seq_chunk runs each checkpointed layer's recomputation in chunks: it needs "
                             "checkpoint=True")
        self.seq_chunk = seq_chunk
        self.model, self.checkpoint, self.mlp_chunk, self.progress = model, bool(checkpoint), mlp_chunk or 0, progress
        self.offloader = _Offloader() if offload else None
        self._patches = Patches()
        self.layers = transformer_layers(model)
        self.mlps = []
        try:
            if offload:
                self._patches.set(model, OFFLOAD_ATTR, offload)
            for index, (_, layer) in enumerate(self.layers):
                self._patches.set(layer, "forward", self._layer_forward(layer.forward, index))
                if self.mlp_chunk:
                    for attr in MLP_NAMES:
                        mlp = getattr(layer, attr, None)
                        if isinstance(mlp, torch.nn.Module):
                            self._patches.set(mlp, "forward", self._chunked_forward(mlp.forward))
                            self.mlps.append(mlp)
        except BaseException:
            self.remove()
            raise

    @property
    def copies(self):
        """The offloaded run's copies, ("to host" | "to device", layer index) in order ([] without offload)."""
        return [] if self.offloader is None else self.offloader.copies

    @property
    def host_peak(self):
        """The most bytes the offloaded checkpoints held in host memory at once (0 without offload)."""
        return 0 if self.offloader is None else self.offloader.host_peak

    def _layer_forward(self, inner, index):
        def forward(*args, **kwargs):
            grad = torch.is_grad_enabled()
            x = _hidden_input(args, kwargs)
            if self.progress is not None and grad and x is not None and x.requires_grad:
                x.register_hook(lambda g: self.progress("backward"))
            if grad and self.checkpoint:
                kwargs = _without_empty_caches(kwargs)
            if grad and self.seq_chunk is not None and x is not None:
                from attnlrp_fast import seqchunk

                out = seqchunk.run_layer(inner, args, kwargs, self.seq_chunk, self.offloader, index,
                                         layer=self.layers[index])
            elif grad and self.checkpoint and self.offloader is not None and x is not None:
                out = _offloaded(inner, self.offloader, index, args, kwargs)
            elif grad and self.checkpoint:
                out = _checkpoint(inner, *args, use_reentrant=False, **kwargs)
            else:
                out = inner(*args, **kwargs)
            if self.progress is not None:
                self.progress("forward")
            return out
        return forward

    def _chunked_forward(self, inner):
        chunk = self.mlp_chunk

        def forward(hidden_states, *args, **kwargs):
            if args or kwargs or not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 \
                    or hidden_states.shape[1] <= chunk:
                return inner(hidden_states, *args, **kwargs)
            grad = torch.is_grad_enabled() and hidden_states.requires_grad
            outs = []
            starts = range(0, hidden_states.shape[1], chunk)
            for index, start in enumerate(starts):
                part = hidden_states[:, start:start + chunk].contiguous()
                y = self._chunk(inner, part, grad, index, len(starts), outs)
                if not isinstance(y, torch.Tensor) or y.shape[:2] != part.shape[:2]:
                    # not position-wise in a form we can concatenate: run it whole
                    return inner(hidden_states)
                outs.append(y)
            return torch.cat(outs, dim=1)
        return forward

    @staticmethod
    def _chunk(inner, part, grad, index, count, outs):
        """The MLP on chunk `index` of `count` (`outs`: the earlier chunks' outputs), checkpointed when it takes
        gradients. af.estimate_memory stands in for the middle chunks of a run on meta tensors (estimate.py)."""
        return _checkpoint(inner, part, use_reentrant=False) if grad else inner(part)

    def remove(self):
        self._patches.restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def low_memory(model, *, checkpoint=True, mlp_chunk=1024, progress=None, offload=None,
               seq_chunk=None) -> LowMemoryHandle:
    """Checkpoint every transformer layer and run MLPs in chunks of `mlp_chunk` tokens; offload="cpu" keeps the
    checkpoints in host memory (see the module docstring); seq_chunk=C runs each layer, forward and backward, in
    chunks of C positions with only its keys and values full length (attnlrp_fast/seqchunk.py). A context manager;
    or keep the handle and call .remove()."""
    return LowMemoryHandle(model, checkpoint=checkpoint, mlp_chunk=mlp_chunk, progress=progress, offload=offload,
                           seq_chunk=seq_chunk)


def maybe_low_memory(model, enabled, **kwargs):
    return low_memory(model, **kwargs) if enabled else contextlib.nullcontext()
