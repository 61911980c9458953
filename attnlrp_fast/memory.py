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
"""

import contextlib

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from attnlrp_fast.patching import Patches

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


class LowMemoryHandle:
    """The patches low_memory() applied; remove() (or leaving the with-block) undoes them."""

    def __init__(self, model, *, checkpoint=True, mlp_chunk=1024, progress=None):
        if mlp_chunk is not None and (not isinstance(mlp_chunk, int) or mlp_chunk < 0):
            raise ValueError(f"mlp_chunk must be a positive number of tokens, 0 or None (no chunking), got {mlp_chunk!r}")
        self.model, self.checkpoint, self.mlp_chunk, self.progress = model, bool(checkpoint), mlp_chunk or 0, progress
        self._patches = Patches()
        self.layers = transformer_layers(model)
        self.mlps = []
        try:
            for _, layer in self.layers:
                self._patches.set(layer, "forward", self._layer_forward(layer.forward))
                if self.mlp_chunk:
                    for attr in MLP_NAMES:
                        mlp = getattr(layer, attr, None)
                        if isinstance(mlp, torch.nn.Module):
                            self._patches.set(mlp, "forward", self._chunked_forward(mlp.forward))
                            self.mlps.append(mlp)
        except BaseException:
            self.remove()
            raise

    def _layer_forward(self, inner):
        def forward(*args, **kwargs):
            grad = torch.is_grad_enabled()
            x = _hidden_input(args, kwargs)
            if self.progress is not None and grad and x is not None and x.requires_grad:
                x.register_hook(lambda g: self.progress("backward"))
            if grad and self.checkpoint:
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


def low_memory(model, *, checkpoint=True, mlp_chunk=1024, progress=None) -> LowMemoryHandle:
    """Checkpoint every transformer layer and run MLPs in chunks of `mlp_chunk` tokens (see the module
    docstring). A context manager; or keep the handle and call .remove()."""
    return LowMemoryHandle(model, checkpoint=checkpoint, mlp_chunk=mlp_chunk, progress=progress)


def maybe_low_memory(model, enabled, **kwargs):
    return low_memory(model, **kwargs) if enabled else contextlib.nullcontext()
