"""af.estimate_memory: how much memory one explanation needs, for any model, before a GPU is touched.

It runs the real explanation code (af.explain with its checkpointing, MLP chunking and target handling, or the
contrast modes below) on a model built from its config alone on PyTorch's meta device: every tensor has its shape
and dtype and no data, so nothing is read, downloaded or computed, and a 1M-token run of an 80-layer model takes
seconds. On the meta device the Triton launchers make exactly the allocations they make on a GPU and launch nothing
(kernels/attention_common.py `launchable`), so the estimate is the GPU run's. A dispatch mode (LiveBytes) counts
the bytes of every tensor storage created during the run and frees them when the storage dies, forward and backward:
the peak is the most that is ever live on top of the weights, and `where` says when it happens.

What a long run costs is the MLP chunks: low_memory runs each layer's MLP in chunks of mlp_chunk tokens, three
times (forward, recomputation, backward), and a meta op costs what a small real one does (1M tokens: 1,024 chunks a
layer). The chunks are alike, and what is live around them moves one way: the forward holds more after each chunk
(its output, until all are concatenated; its input too where it is saved for the backward) and the backward, chunk
by chunk in reverse order, frees it again, so the most any chunk reaches is reached in the last two. The run
computes the first chunk and the last two as they are and stands in for the ones between (StoodInChunk: the input
saved through the same saved-tensor hooks, an output and an input gradient of the same shapes, none of the chunk's
working memory): the peak, where it is and the largest tensor are those of the whole run to the byte (a test checks
them against exact=True, which runs every chunk).

Modes:
  low_memory  af.explain(checkpoint=True, mlp_chunk=...): every layer checkpointed, MLPs in token chunks (the CLI's
              default)
  plain       af.explain(): every activation kept for the backward
  lxt_style   the reference implementation's approach for contrast: SDPA (flash) with the gradients rescaled in
              autograd, norms and GLU patched in Python, HF gradient checkpointing (baselines/lxt_style.py)
  eager       the same rules on HF's eager attention (the N x N attention matrix) without checkpointing

What the meta run cannot see, measured against a GPU run by the device check: the caching allocator's rounding
(blocks of 512 bytes, 2 MiB segments), cuBLAS and Triton workspaces, the CUDA context (hundreds of MiB outside
torch's counters). Against a real run's live-tensor accounting on CPU the estimate is exact up to the handful of
bytes of scalars (tests/core/test_estimate.py).
"""

import contextlib
import os
import re
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnlrp_fast.patching import Patches

MODES = ("low_memory", "plain", "lxt_style", "eager")


def _tensors(obj, found):
    """Append the tensors in an op's arguments or results (nested tuples, lists and dicts) to `found`."""
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _tensors(x, found)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors(x, found)
    return found


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created while active, live until their storage dies; the peak and the location
    (`where`, set by the caller) at which it was reached. Storages are told apart by their C++ identity, so it counts
    meta tensors (no data pointer) as it counts real ones."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak, self.largest = {}, 0, 0, 0
        self.where, self.peak_where = "start", "start"
        self.by_where = {}     # the most held at each place

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fresh = [s for s in (t.untyped_storage() for t in _tensors(out, [])) if s._cdata not in self.live]
        if not fresh:     # no output, or views of counted storages: nothing to look up among the inputs
            return out
        # an output on the storage of an input is a view (or in place): nothing new, whether or not that storage
        # was counted (the weights and inputs exist before the run)
        seen = {t.untyped_storage()._cdata for t in _tensors((args, kwargs), [])}
        for storage in fresh:
            self._count(storage, seen)
        return out

    def _count(self, storage, seen):
        key = storage._cdata
        if key in self.live or key in seen:
            return
        n = storage.nbytes()
        self.live[key] = n
        self.current += n
        self.largest = max(self.largest, n)
        if self.current > self.peak:
            self.peak, self.peak_where = self.current, self.where
        if self.current > self.by_where.get(self.where, 0):
            self.by_where[self.where] = self.current
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.current -= self.live.pop(key, 0)


@dataclass
class MemoryEstimate:
    """One explanation's memory, in bytes."""
    mode: str
    tokens: int
    batch: int
    dtype: str
    weights: int        # the model's parameters and buffers
    peak: int           # the most the explanation holds on top of them at once
    where: str          # when that happens: "forward, layer 3 of 32", "backward, layer 31 of 32", ...
    largest: int        # the largest single tensor
    host: int = 0       # with offload="cpu": the most the layers' checkpoints hold in host memory at once
    gpus: int = 1       # with gpus=K (context parallelism): each figure is one GPU's (rank 0's, which holds the target)
    ring_bytes: int = 0  # with gpus=K: the bytes each GPU sends per layer round the ring (ring_traffic)
    by_where: dict = field(default_factory=dict, repr=False, compare=False)   # the most held at each place

    @property
    def total(self):
        return self.weights + self.peak


def model_shapes():
    """The configs of well-known models this package ships as numbers (data/model_shapes.json): name -> dict."""
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parent / "data" / "model_shapes.json").read_text())


def load_config(source):
    """A HF config from a shipped shape name (model_shapes), "smollm2" (the installed SmolLM2), a config JSON file, a
    model folder or a hub id. ValueError naming what is wrong (smollm2.NotInstalled when SmolLM2 is not installed)."""
    import json
    from pathlib import Path

    import transformers

    shapes = model_shapes()
    if source in shapes:
        fields = dict(shapes[source])
        return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(source)
    if source == "smollm2" and not path.exists():   # the offline instruct LLM (attnlrp_fast/smollm2.py)
        from attnlrp_fast import smollm2

        return smollm2.config()
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{source} is not a config JSON file ({e})") from None
        if not isinstance(fields, dict) or "model_type" not in fields:
            raise ValueError(f"{source} has no model_type: not a HF config")
        model_type = fields.pop("model_type")
        try:
            return transformers.AutoConfig.for_model(model_type, **fields)
        except ValueError:
            raise ValueError(f"{source}: model_type {model_type!r} is not one transformers knows") from None
    if not path.exists() and (path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1):
        raise ValueError(f"no model config at {source!r}: no such file or folder")
    from attnlrp_fast import hub

    label = f"no model config at {source!r} (shipped names: {', '.join(shapes)})"
    options = hub.from_pretrained_options(source, known=list(shapes), label=label)   # an unknown name fails at once
    try:
        return transformers.AutoConfig.from_pretrained(source, **options)
    except (OSError, ValueError) as e:
        raise ValueError(f"no model config at {source!r} (a shipped name: {', '.join(shapes)}; a config JSON file; a "
                         f"model folder; or a hub id, which needs the network): {str(e).splitlines()[0]}"
                         f"{hub.did_you_mean(source, list(shapes))}") from None


def meta_model(model_or_config, dtype):
    """The model on the meta device: a config (or a model, whose config is used) -> a causal LM of that config."""
    import transformers

    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, transformers.PretrainedConfig):
        raise TypeError(f"estimate_memory takes a HF model or its config, got {type(model_or_config).__name__}")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()     # its advice on building encoders as decoders: the error says it
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as e:
            raise ValueError(f"{type(config).__name__} ({config.model_type!r}) is not a causal language model this "
                             f"transformers can build: {str(e).splitlines()[0]}") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
    flags = {m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)}
    if flags == {False}:    # an encoder's LM head (BERT without is_decoder): every token sees the whole input
        raise ValueError(f"{type(config).__name__} ({config.model_type!r}) builds {type(model).__name__} with "
                         "bidirectional attention: not a causal language model")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class _Locator:
    """Forward hooks that tell LiveBytes where the run is: which layer, forward or backward (a layer's forward in
    the backward is its checkpoint being recomputed; the gradient of a layer's output marks its backward)."""

    def __init__(self, model, meter):
        from attnlrp_fast.memory import transformer_layers

        self.meter, self.backward, self.handles = meter, False, []
        layers = transformer_layers(model)
        for i, (_, layer) in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._entering(i, len(layers))))
            self.handles.append(layer.register_forward_hook(self._leaving(i, len(layers))))
        head = model.get_output_embeddings()
        if head is not None:
            self.handles.append(head.register_forward_hook(self._head))

    def _entering(self, i, n):
        def hook(module, args):
            self.meter.where = f"{'backward (recomputing)' if self.backward else 'forward'}, layer {i + 1} of {n}"
        return hook

    def _leaving(self, i, n):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.requires_grad and not self.backward:
                out.register_hook(lambda g: setattr(self.meter, "where", f"backward, layer {i + 1} of {n}"))
        return hook

    def _head(self, module, args, output):
        self.meter.where = "output layer and target"
        self.backward = True

    def remove(self):
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _meta_safe_transformers():
    """transformers checks position ids for packed sequences by value before building masks; on the meta device
    there are no values (and the estimate never packs): that one check is off for the run."""
    import transformers.masking_utils as mu

    with Patches() as patches:
        patches.set(mu, "find_packed_sequence_indices", lambda position_ids: None)
        yield


@contextlib.contextmanager
def _as_on_gpu():
    """The kernels' launch configurations as on a GPU, not the interpreter's (kernels/attention_common.py
    `interpreting` reads the variable at each launch)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _flash_sdpa(sdpa):
    """F.scaled_dot_product_attention as a GPU runs it for the contrast mode: on the meta device SDPA would pick
    its math backend (the N x N matrix); a GPU takes flash attention, whose meta kernels allocate what it does (the
    output and the log-sum-exp, and in the backward the three gradients)."""
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or not query.is_meta:
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]
    return attention


class StoodInChunk(torch.autograd.Function):
    """A middle MLP chunk of a meta run (module docstring): what a checkpointed chunk holds and makes, without its
    work. Its input is saved as torch.utils.checkpoint saves a chunk's input (save_for_backward, through the
    saved-tensor hooks of an enclosing layer checkpoint), its output is new, and so is its input's gradient."""

    @staticmethod
    def forward(ctx, part, shape, dtype):
        ctx.save_for_backward(part)
        return part.new_empty(shape, dtype=dtype)

    @staticmethod
    def backward(ctx, grad):
        (part,) = ctx.saved_tensors
        return torch.empty_like(part, memory_format=torch.contiguous_format), None, None


def _chunk_or_stand_in(real):
    """memory.LowMemoryHandle._chunk that stands in for the chunks between the first and the last two of a meta
    run that takes gradients."""
    def chunk(inner, part, grad, index, count, outs):
        if not (grad and part.is_meta and 0 < index < count - 2):
            return real(inner, part, grad, index, count, outs)
        return StoodInChunk.apply(part, part.shape[:2] + outs[0].shape[2:], outs[0].dtype)
    return staticmethod(chunk)


@contextlib.contextmanager
def _stood_in_chunks(enabled):
    from attnlrp_fast.memory import LowMemoryHandle

    with Patches() as patches:
        if enabled:
            patches.set(LowMemoryHandle, "_chunk", _chunk_or_stand_in(LowMemoryHandle._chunk))
        yield


def _run(model, ids, mode, mlp_chunk, offload=None, seq_chunk=None, gpus=1):
    """One explanation in `mode`; the bytes its offloaded checkpoints held in host memory at most (0 without).
    gpus > 1: rank 0's share under context parallelism, the ring simulated (context_parallel.py)."""
    import attnlrp_fast as af

    if mode in ("low_memory", "plain"):
        from attnlrp_fast.context_parallel import ContextParallel
        from attnlrp_fast.memory import offload_meter

        cp = ContextParallel.simulated(gpus) if gpus > 1 else None
        with offload_meter() as offloaders:
            af.explain(model, input_ids=ids, checkpoint=mode == "low_memory", mlp_chunk=mlp_chunk, offload=offload,
                       seq_chunk=seq_chunk, context_parallel=cp)
        return max((o.host_peak for o in offloaders), default=0)
    from attnlrp_fast.baselines import lxt_style

    try:
        lxt_style.patch(model)
    except ValueError as e:      # transformers refuses SDPA for the family, or no Llama-type norm/MLP found
        raise ValueError(f"the lxt_style and eager modes (baselines/lxt_style.py) cover Llama-type models with "
                         f"SDPA attention: {str(e).split('. ')[0]}") from None
    if mode == "eager":
        model.set_attn_implementation(lxt_style.EAGER_NAME)
    with Patches() as patches:
        F = torch.nn.functional
        patches.set(F, "scaled_dot_product_attention", _flash_sdpa(F.scaled_dot_product_attention))
        lxt_style.explain(model, ids, checkpoint=mode == "lxt_style")
    return 0


def _check_arguments(mode, tokens, batch, mlp_chunk, offload=None, seq_chunk=None, gpus=1):
    from attnlrp_fast.memory import check_offload_options

    check_offload_options(offload, seq_chunk)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"gpus must be a positive int, got {gpus!r}")
    if gpus > 1 and mode not in ("low_memory", "plain"):
        raise ValueError(f"gpus={gpus}: context parallelism shards af.explain (modes low_memory and plain), not "
                         f"mode {mode!r}")
    if gpus > 1 and seq_chunk is not None:
        raise ValueError("seq_chunk and gpus > 1 (context parallelism) cannot be combined")
    if gpus > 1 and tokens < 2 * gpus:
        raise ValueError(f"{tokens} tokens cannot be sharded over {gpus} GPUs (two chunks per GPU)")
    if offload is not None and mode != "low_memory":
        raise ValueError(f"offload='cpu' moves low_memory's checkpoints to the host; mode {mode!r} has none")
    if seq_chunk is not None and mode != "low_memory":
        raise ValueError(f"seq_chunk runs low_memory's checkpointed layers in chunks; mode {mode!r} has none")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if mlp_chunk is not None and (not isinstance(mlp_chunk, int) or isinstance(mlp_chunk, bool) or mlp_chunk < 0):
        raise ValueError(f"mlp_chunk must be a number of tokens (0: no chunking), got {mlp_chunk!r}")


def _measure(config, tokens, dtype, batch, mode, mlp_chunk, every_chunk=False, offload=None,
             seq_chunk=None, gpus=1) -> MemoryEstimate:
    """One meta run of the whole explanation (every_chunk: no MLP chunk stood in for)."""
    model = meta_model(config, dtype)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    ids = torch.zeros((batch, tokens), dtype=torch.long, device="meta")
    # the launchers choose their configuration as on a GPU, whether or not this process runs Triton's interpreter
    # (its configurations differ, and with them a few small allocations)
    with _meta_safe_transformers(), _as_on_gpu(), _stood_in_chunks(not every_chunk), LiveBytes() as meter:
        locator = _Locator(model, meter)
        try:
            host = _run(model, ids, mode, mlp_chunk, offload, seq_chunk, gpus)
        except (NotImplementedError, RuntimeError) as e:   # an op of this family with no meta implementation
            raise ValueError(f"{type(model).__name__} cannot run on meta tensors in mode {mode!r}: "
                             f"{str(e).splitlines()[0][:200]}") from None
        finally:
            locator.remove()
    return MemoryEstimate(mode, tokens, batch, str(dtype).split(".")[-1], weights, meter.peak, meter.peak_where,
                          meter.largest, host, gpus, ring_traffic(config, tokens, gpus, dtype, batch,
                                                                  checkpoint=mode == "low_memory"),
                          dict(meter.by_where))


def ring_traffic(config, tokens, gpus, dtype=torch.bfloat16, batch=1, checkpoint=True):
    """Bytes one GPU sends per layer round the context-parallel ring (bindings/ring.py), the largest shard's: its
    keys and values K - 1 times in the forward (again in a checkpointed layer's recomputation), then in the backward
    K - 1 times with their float32 dK, dV accumulators, and the accumulators once more; 0 with one GPU."""
    if gpus <= 1:
        return 0
    from attnlrp_fast.bindings.ring import shard_positions

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shard = max(shard_positions(tokens, gpus, r).numel() for r in range(gpus))
    elements = batch * kv_heads * shard * 2 * head_dim
    kv = elements * torch.empty((), dtype=dtype).element_size()
    forwards = 2 if checkpoint else 1
    return forwards * (gpus - 1) * kv + (gpus - 1) * (kv + 4 * elements) + 4 * elements


def explanation_flops(model_or_config, tokens, *, batch=1, mode="low_memory", seq_chunk=None):
    """The floating-point operations of one explanation of `tokens` tokens (a count, not a measurement): the
    layers' linear maps (2 per weight per token; every expert's weights for a mixture of experts, so an upper bound
    there) and causal attention (2 N^2 H D forward: Q K^T and P V over the half the mask keeps), times the passes:
    forward, the checkpointed recomputation (low_memory) and the backward (twice the forward for the linear maps,
    2.5 times for attention, as flash attention's backward does); seq_chunk adds the keys' and values' projections
    again (twice) and their backward. The LM head counts only where the target reads it."""
    config = getattr(model_or_config, "config", model_or_config)
    model = meta_model(config, torch.bfloat16)
    from attnlrp_fast.memory import transformer_layers

    layers = transformer_layers(model)
    linear = kv = 0
    for _, layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                linear += module.weight.numel()
                if name.split(".")[-1] in ("k_proj", "v_proj"):
                    kv += module.weight.numel()
    heads = getattr(config, "num_attention_heads", 0) or 0
    attention = len(layers) * heads * (getattr(config, "head_dim", None) or config.hidden_size // max(heads, 1))
    n = batch * tokens
    forward_linear, forward_attention = 2 * linear * n, 2 * attention * batch * tokens * tokens
    passes_linear = (1 + 1 + 2) if mode == "low_memory" else (1 + 2)
    passes_attention = (1 + 1 + 2.5) if mode == "low_memory" else (1 + 2.5)
    extra = 2 * kv * n * (2 + 2) if seq_chunk else 0
    return int(forward_linear * passes_linear + forward_attention * passes_attention + extra)


def with_layers(config, layers):
    """A copy of the config with `layers` transformer layers (per-layer lists such as Gemma's layer_types cut)."""
    import copy

    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    for name in ("layer_types",):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            setattr(config, name, list(value)[:layers])
    return config


def estimate_memory(model_or_config, tokens, *, dtype=torch.bfloat16, batch=1, mode="low_memory",
                    mlp_chunk=1024, exact=False, offload=None, seq_chunk=None, gpus=1) -> MemoryEstimate:
    """Peak memory of one explanation of `tokens` tokens (target: the argmax logit at the last position) by the model
    of this config in `dtype`, in one of MODES, as it would run on a GPU. See the module docstring.

    A model's layers are alike, so each adds the same bytes: unless `exact`, the run is done with 2, 3 and 4 layers
    and the most held at each place of the run extended to the model's depth (_extrapolated: at the last layer on a
    line to the byte, at a fixed early layer the same); where the runs do not bear that out, the whole model runs.
    Weights are always counted for the whole model. `exact` also
    runs every MLP chunk (module docstring): the same numbers, slower. offload="cpu" (low_memory only): the layers'
    checkpoints in host memory (af.low_memory), counted in `host`, not in `peak`. seq_chunk=C (low_memory only):
    each layer in chunks of C positions (attnlrp_fast/seqchunk.py). gpus=K (low_memory, plain): context parallelism
    over K GPUs (attnlrp_fast/context_parallel.py), each figure one GPU's (rank 0, which holds the target), its ring
    traffic per layer in `ring_bytes`."""
    _check_arguments(mode, tokens, batch, mlp_chunk, offload, seq_chunk, gpus)
    kw = dict(offload=offload, seq_chunk=seq_chunk, gpus=gpus)
    config = getattr(model_or_config, "config", model_or_config)
    layers = getattr(config, "num_hidden_layers", None)
    if exact or not isinstance(layers, int) or layers <= len(_RUNS) + 1:
        return _measure(config, tokens, dtype, batch, mode, mlp_chunk, every_chunk=exact, **kw)
    runs = [_measure(with_layers(config, k), tokens, dtype, batch, mode, mlp_chunk, **kw) for k in _RUNS]
    host_step = runs[1].host - runs[0].host
    found = _extrapolated(runs, layers)
    if runs[2].host - runs[1].host != host_step or found is None:
        return _measure(config, tokens, dtype, batch, mode, mlp_chunk, **kw)
    full = meta_model(config, dtype)
    weights = sum(t.numel() * t.element_size() for t in list(full.parameters()) + list(full.buffers()))
    return MemoryEstimate(mode, tokens, batch, runs[2].dtype, weights, found[0], found[1], runs[2].largest,
                          runs[2].host + (layers - _RUNS[2]) * host_step, gpus, runs[2].ring_bytes)


_RUNS = (2, 3, 4)   # the depths a long model's estimate is extrapolated from (with one layer, the last is the first)
_AT_LAYER = re.compile(r"(.*), layer (\d+) of (\d+)")


def _extrapolated(runs, layers):
    """(peak, where) for `layers` layers from the _RUNS-layer runs' peaks by place (MemoryEstimate.by_where),
    or None when the runs do not bear it out. A place at the last layer, or outside the layers, grows by the same
    bytes per layer (the checkpoints of the layers before it); a place at a fixed early layer (the first layer's
    backward, where the embeddings' gradient arrives, or the second) holds what the layers up to it hold, whatever
    comes after: the same in every run that has it. The most of all places is the peak."""
    keyed = []
    for k, run in zip(_RUNS, runs):
        places = {}
        for where, held in run.by_where.items():
            m = _AT_LAYER.fullmatch(where)
            key = (where, None) if m is None else (m.group(1), "last" if int(m.group(2)) == k else int(m.group(2)))
            places[key] = held
        keyed.append(places)
    best = None
    for key in keyed[2]:
        held = [places.get(key) for places in keyed]
        if key[1] is None or key[1] == "last":
            if None in held or held[2] - held[1] != held[1] - held[0]:
                return None
            value = held[2] + (layers - _RUNS[2]) * (held[2] - held[1])
            where = key[0] if key[1] is None else f"{key[0]}, layer {layers} of {layers}"
        else:
            if any(h is not None and h != held[2] for h in held):
                return None
            value, where = held[2], f"{key[0]}, layer {key[1]} of {layers}"
        if best is None or value > best[0]:
            best = (value, where)
    return best


def _bracket(at, budget, lo, e_lo, guess, start, limit):
    """((lo, estimate), (hi, estimate)) with lo fitting and hi not, searched from `guess` in steps of a quarter;
    (None, (limit, estimate)) when the limit itself fits."""
    e = at(guess)
    if e.total <= budget:
        lo, e_lo = guess, e
        while True:
            if lo >= limit:
                return None, (lo, e_lo)
            n = min(limit, max(lo + start, int(lo * 1.25) // start * start))
            e = at(n)
            if e.total > budget:
                return (lo, e_lo), (n, e)
            lo, e_lo = n, e
    hi, e_hi = guess, e
    while True:
        n = max(lo, int(hi * 0.8) // start * start)
        if n <= lo:
            return (lo, e_lo), (hi, e_hi)
        e = at(n)
        if e.total <= budget:
            return (n, e), (hi, e_hi)
        hi, e_hi = n, e


def longest_fitting(model_or_config, budget_bytes, *, dtype=torch.bfloat16, mode="low_memory", mlp_chunk=1024,
                    batch=1, start=1024, limit=1 << 24, precision=0.0, progress=None, offload=None,
                    seq_chunk=None, gpus=1):
    """The longest input (a multiple of `start` tokens, up to `limit`) whose explanation fits `budget_bytes` with
    the weights, and its estimate; (0, None) when not even `start` tokens fit. The memory grows with the length in
    every mode and nearly on a line (eager mode aside): the line through `start` and `2 start` gives a first guess,
    steps of a quarter bracket the budget, then secant steps alternating with bisection narrow the bracket to
    `start` tokens, or `precision` of the length. A handful of estimates, where doubling would take twenty;
    progress() after each."""
    def at(n):
        e = estimate_memory(model_or_config, n, dtype=dtype, batch=batch, mode=mode, mlp_chunk=mlp_chunk,
                            offload=offload, seq_chunk=seq_chunk, gpus=gpus)
        if progress is not None:
            progress()
        return e

    lo, e_lo = start, at(start)
    if e_lo.total > budget_bytes:
        return 0, None
    e2 = at(2 * start)
    if e2.total > budget_bytes:
        hi, e_hi = 2 * start, e2
    else:   # a first guess from the line through the two, then widen by quarters until the budget is bracketed
        slope = max(e2.total - e_lo.total, 1) / start
        lo, e_lo = 2 * start, e2
        guess = min(limit, max(lo + start, int(lo + (budget_bytes - e2.total) / slope) // start * start))
        fitting, too_long = _bracket(at, budget_bytes, lo, e_lo, guess, start, limit)
        if fitting is None:
            return too_long        # (the limit, its estimate): the limit itself fits
        (lo, e_lo), (hi, e_hi) = fitting, too_long
    step = 0
    while hi - lo > max(start, int(lo * precision)):
        if step % 2 == 0:   # secant
            guess = lo + (budget_bytes - e_lo.total) * (hi - lo) / max(e_hi.total - e_lo.total, 1)
        else:               # bisection
            guess = (lo + hi) / 2
        mid = min(max(int(guess) // start * start, lo + start), hi - start)
        e = at(mid)
        if e.total <= budget_bytes:
            lo, e_lo = mid, e
        else:
            hi, e_hi = mid, e
        step += 1
    return lo, e_lo
