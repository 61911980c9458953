"""Context parallelism: one explanation of a long sequence, its positions sharded across the ranks of a
torch.distributed process group (NCCL on GPUs, gloo on CPU).

    af.explain(model, input_ids=ids, context_parallel=group)         # every rank, the same inputs
    with af.context_parallel(model, group):                          # or as a scope
        e = af.explain(model, input_ids=ids)
    torchrun --nproc-per-node K -m attnlrp_fast.app.cli explain ... --context-parallel

Every rank passes the same inputs (token ids are small; they are checked to be the same) and holds the model; the
library shards the work. Rank r runs the model on its shard of the positions (bindings/ring.py: chunk r and chunk
2K - 1 - r of 2K, balanced for causal attention) with the global position ids (rotary positions are the global
ones); everything in a decoder layer but attention is per position, and attention is the ring attention: each layer
attends over every rank's keys and values as they pass round the ring, and its backward sends dK/dV round after
them. The target's logits are computed on the rank that holds its position; the other ranks seed nothing but run
the same backward (the ring needs every rank in every layer). The token relevance comes back to every rank
(gather=True, the default) or stays with the rank that holds it (gather=False: e.relevance (B, n_r) with
e.shard_positions, the global positions of its columns). Layers are checkpointed as af.low_memory does, with
offload="cpu" as well. A reasoning span (reasoning_span=, hops=) may cross shards: each reasoning token's logit is
read on the rank that holds its predicting position, each hop's seeds come from the gathered relevance of the hop
before, and every rank runs each hop's backward over the one forward.

Exact: the relevance equals the one-process explanation (tests: 2 and 3 gloo ranks, float32 within 1e-5; the hops,
which divide by the reasoning logits, as close to float64 as the one-process float32 hops are).
Refused in one line (UnsupportedModelError / ValueError), never computed otherwise: models whose layers are not
transformers' decoder layers or mix positions other than by attention (seqchunk.check_layer), attention that is not
causal or takes a position bias, sinks, packed sequences or image blocks; a layer whose attention did not reach the
ring; padded batches of a model that derives its positions from the padding; inputs that differ between ranks;
targets other than token targets at positions (a callable), latents, images, sequence chunks, and reasoning spans with
gather=False.
Every collective waits at most `timeout` seconds: a rank that fails or is killed makes the others raise
ContextParallelError instead of hanging.
"""

import contextlib
import inspect
import zlib

import torch

from attnlrp_fast.bindings.hf import ATTEND_ATTR, attention_modules, mask_parts
from attnlrp_fast.bindings.ring import ContextParallelError, Ring, RingPlan, ring_attention, shard_positions
from attnlrp_fast.models.common import UnsupportedModelError
from attnlrp_fast.seqchunk import check_layer

CP_ATTR = "_attnlrp_fast_context_parallel"   # on a model inside af.context_parallel(): its ContextParallel
DEFAULT_TIMEOUT = 1800.0

__all__ = ["ContextParallel", "ContextParallelError", "context_parallel", "of_model"]


class ContextParallel:
    """A process group that shards explanations: the ring, the timeout, whether the relevance is gathered."""

    def __init__(self, group=None, *, timeout=DEFAULT_TIMEOUT, gather=True):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("context_parallel needs torch.distributed initialised first (run under torchrun, or "
                             "call torch.distributed.init_process_group)")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"context_parallel timeout must be a positive number of seconds, got {timeout!r}")
        self.ring = Ring(dist.group.WORLD if group is None or group is True else group, float(timeout))
        self.gather = bool(gather)
        self.plan = self.kpm = None
        self.calls = 0

    @classmethod
    def simulated(cls, size):
        """Rank 0 of `size` ranks on the meta device, for af.estimate_memory: the ring allocates what rank 0 would
        receive and sends nothing (bindings/ring.py Ring.simulated); the collectives keep their shapes."""
        cp = cls.__new__(cls)
        cp.ring, cp.gather, cp.plan, cp.kpm, cp.calls = Ring.simulated(size), True, None, None, 0
        return cp

    @property
    def size(self):
        return self.ring.size

    @property
    def rank(self):
        return self.ring.rank

    # --- the attention call of every layer ---------------------------------------------------------------------
    def attend(self, module, query, key, value, attention_mask, *, scale, window, softcap, sinks, rule, backend,
               is_causal, position_bias):
        """A layer's attention call (bindings/hf.py hands it here): the ring attention, (B, n_r, H, D)."""
        name = type(module).__name__
        if self.plan is None:
            raise ValueError(f"{name}: the model is inside af.context_parallel(), which serves explain() only; "
                             "call the model outside that scope")
        if position_bias is not None or is_causal is False:
            raise UnsupportedModelError(f"{name}: context parallelism takes causal attention without a position "
                                        "bias")
        if sinks is not None:
            raise UnsupportedModelError(f"{name}: attention sinks are not supported with context parallelism")
        parts = mask_parts(attention_mask)
        if parts is None or parts[1] is not None or parts[2] is not None:
            raise UnsupportedModelError(f"{name}: a mask beyond key padding (packed sequences, image blocks, an N x M "
                                        "mask) is not supported with context parallelism")
        n = self.plan.lengths[self.rank]
        if query.shape[2] != n or key.shape[2] != n:
            raise UnsupportedModelError(f"{name}: its keys cover {key.shape[2]} positions where this rank holds {n} "
                                        "(a cache, or keys of their own): it cannot be sharded")
        self.calls += 1
        out = ring_attention(query, key, value, self.plan, key_padding_mask=self.kpm,
                             scale=scale if scale is not None else query.shape[-1] ** -0.5, window=window,
                             softcap=softcap, rule=rule, backend=backend)
        return out.transpose(1, 2).contiguous()

    @contextlib.contextmanager
    def sharded(self, model, n, attention_mask, device):
        """For one explanation of n positions: the plan, the (B, N) key padding mask (None when nothing is padded),
        the ring attention on every attention module of `model`; yields this rank's global positions (on
        `device`)."""
        if n < 2 * self.size:
            raise ValueError(f"{n} positions cannot be sharded over {self.size} ranks (it takes at least "
                             f"{2 * self.size}: two chunks per rank)")
        modules = attention_modules(model)
        saved = [(m, m.__dict__.get(ATTEND_ATTR)) for m in modules]
        self.plan = RingPlan(n, self.ring)
        self.kpm = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        self.calls = 0
        for m in modules:
            setattr(m, ATTEND_ATTR, self.attend)
        try:
            yield shard_positions(n, self.size, self.rank, device=device)
        finally:
            for m, before in saved:
                if before is None:
                    m.__dict__.pop(ATTEND_ATTR, None)
                else:
                    setattr(m, ATTEND_ATTR, before)
            self.plan = self.kpm = None

    # --- checks --------------------------------------------------------------------------------------------------
    def check_model(self, model, padded):
        """UnsupportedModelError for a model this cannot shard (module docstring)."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        from attnlrp_fast.inputs import forward_parameters

        params = forward_parameters(model)
        for needed in ("position_ids", "logits_to_keep"):
            if needed not in params:
                raise UnsupportedModelError(f"{type(model).__name__} takes no {needed}: context parallelism needs a "
                                            "causal LM that takes both")
        if getattr(model.config, "is_encoder_decoder", False):
            raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model: context parallelism "
                                        "shards decoder-only causal LMs")
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
        if not layers:
            raise UnsupportedModelError(f"{type(model).__name__} has no transformers decoder layers: it cannot be "
                                        "sharded")
        for name, layer in layers:
            check_layer(name, layer, "be sharded over ranks")
        self.layers = len(layers)
        if padded and not _positions_ignore_padding(model):
            raise UnsupportedModelError(f"{type(model).__name__} derives its position ids from the padding: a padded "
                                        "batch cannot be sharded (pass rows without padding)")

    def check_calls(self):
        """After the forward: every decoder layer's attention reached the ring (UnsupportedModelError if not)."""
        if self.calls != self.layers:
            raise UnsupportedModelError(f"{self.layers} decoder layers but {self.calls} attention calls reached the "
                                        "ring: a layer computes attention in code of its own, which cannot be "
                                        "sharded")

    def check_same(self, *values):
        """ValueError unless every rank passed the same values (tensors, numbers, targets)."""
        if self.ring.meta:
            return
        fingerprint = torch.tensor([_fingerprint(v) for v in values], dtype=torch.int64)
        every = self.all_gather(fingerprint)
        differ = [r for r, f in enumerate(every) if not torch.equal(f, fingerprint)]
        if differ:
            raise ValueError(f"context parallel: rank {self.rank} and rank(s) {differ} were given different inputs "
                             "(input_ids, attention_mask, target or position); every rank must pass the same")

    # --- collectives with timeouts -------------------------------------------------------------------------------
    def _device_of(self, t):
        import torch.distributed as dist

        backend = dist.get_backend(self.ring.group)
        return t.cuda() if backend == "nccl" and t.device.type != "cuda" else t

    def all_sum(self, t):
        import torch.distributed as dist

        if self.size == 1 or self.ring.meta:
            return t
        x = self._device_of(t.detach().clone())
        self.ring.wait([dist.all_reduce(x, group=self.ring.group, async_op=True)], "summing the target scores")
        return x.to(t.device)

    def all_gather(self, t):
        import torch.distributed as dist

        if self.size == 1 or self.ring.meta:
            return [t] * self.size
        x = self._device_of(t.contiguous())
        out = [torch.empty_like(x) for _ in range(self.size)]
        self.ring.wait([dist.all_gather(out, x, group=self.ring.group, async_op=True)], "gathering")
        return [o.to(t.device) for o in out]

    def gather_positions(self, local, n):
        """(B, N): each rank's (B, n_r) values placed at its positions (inside sharded(): the plan's)."""
        width = max(self.plan.lengths)
        padded = local.new_zeros(local.shape[0], width)
        padded[:, :local.shape[1]] = local
        full = local.new_empty(local.shape[0], n)
        for r, part in enumerate(self.all_gather(padded)):
            idx = shard_positions(n, self.size, r, device=local.device)
            full[:, idx] = part[:, :idx.numel()]
        return full


def _fingerprint(value):
    """A 63-bit checksum of a value, the same on every rank for the same value."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().reshape(-1).contiguous()
        data = repr((tuple(value.shape), str(t.dtype))).encode() + t.view(torch.uint8).numpy().tobytes()
    else:
        data = repr(value).encode()
    return zlib.crc32(data) | (len(data) << 32)


def _positions_ignore_padding(model):
    """Whether the model's default position ids are 0..N-1 whatever the padding (transformers' decoders built on
    cache positions), read from its base model's forward: no cumulative sum of the mask there."""
    base = getattr(model, "base_model", model)
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return False
    return "cumsum" not in source and "position_ids" in source


def of_model(model, argument=None):
    """The ContextParallel an explanation of `model` runs under: from explain(context_parallel=...) (a process
    group, True for the default group, or a ContextParallel), else the model's af.context_parallel() scope, else
    None."""
    if argument is None or argument is False:
        return getattr(model, CP_ATTR, None)
    if isinstance(argument, ContextParallel):
        return argument
    return ContextParallel(argument)


@contextlib.contextmanager
def context_parallel(model, group=None, *, timeout=DEFAULT_TIMEOUT, gather=True):
    """Within the scope, af.explain(model, ...) shards its positions over the ranks of `group` (None: the default
    group) (module docstring). timeout: seconds any collective may wait; gather: the relevance comes back to every
    rank (False: each rank keeps its shard, e.shard_positions)."""
    cp = ContextParallel(group, timeout=timeout, gather=gather)
    before = model.__dict__.get(CP_ATTR)
    setattr(model, CP_ATTR, cp)
    try:
        yield cp
    finally:
        if before is None:
            model.__dict__.pop(CP_ATTR, None)
        else:
            setattr(model, CP_ATTR, before)
