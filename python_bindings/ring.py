"""Ring attention over torch.distributed: causal attention over a sequence sharded across the ranks of a process
group, with the rules' backward (context parallelism: attnlrp_fast/context_parallel.py drives it).

Sharding (balanced for causal attention): the N positions are cut into 2K chunks of near-equal size
(bounds[i] = i * N // 2K); rank r holds chunk r (a head chunk) and chunk 2K - 1 - r (a tail chunk), in that order.
Every rank then has about the same number of visible (query, key) pairs.

Forward: each rank's keys and values (one buffer) go round the ring: K - 1 steps, each sending the buffer held to
rank r + 1 and receiving rank r - 1's, the next exchange in flight while the blocks of the current one are computed.
Each (query chunk, key chunk) pair is one block, one call of the attention op (attention.py) returning its (O_b,
LSE_b); the blocks merge by log-sum-exp (sdpa.merge_block) in float32 (float64 for float64 inputs). Chunks are
whole, so a block is one of: the diagonal (the chunk against itself: causal as usual), a key chunk wholly before
the query chunk (every key visible: non-causal; under a window W the rows that can reach the chunk, and the window
moved by the chunks' distance), or wholly after it (skipped).
Backward, exact: the keys and values go round again, each with float32 dK, dV accumulators that every rank adds its
blocks' contributions to; after K - 1 steps one more send brings each accumulator home. Each block's backward is
the attention op's backward given the merged O, LSE and delta = rowsum(dO O) of the whole row: the exact
whole-softmax gradient of that block's keys, with the rule's factors (kernels/rules.py) applied inside it, so once
in the sum.
Every wait has a timeout: a rank that failed or was killed makes its neighbours raise ContextParallelError (and
through the next collective every rank) instead of hanging.
On the meta device (af.estimate_memory) `Ring.simulated(K)` allocates what rank 0 would receive and sends nothing.
"""

import datetime

import torch

from .attention import attention_bwd_op, attention_fwd_op
from .sdpa import merge_block


class ContextParallelError(RuntimeError):
    """A collective of the context-parallel ring failed or timed out (a rank failed, was killed or is stuck)."""


def shard_bounds(n, ranks):
    """The 2K + 1 chunk bounds of n positions over `ranks` ranks (module docstring)."""
    return [i * n // (2 * ranks) for i in range(2 * ranks + 1)]


def shard_chunks(n, ranks, rank):
    """[(start, end), (start, end)]: the head and tail chunks rank `rank` holds, in global positions."""
    b = shard_bounds(n, ranks)
    tail = 2 * ranks - 1 - rank
    return [(b[rank], b[rank + 1]), (b[tail], b[tail + 1])]


def shard_positions(n, ranks, rank, device=None):
    """(n_r,) int64: the global positions rank `rank` holds, in its local order (ascending)."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in shard_chunks(n, ranks, rank)])


class Ring:
    """A process group seen as a ring: rank, size, the neighbours' global ranks, the timeout of every wait."""

    def __init__(self, group, timeout):
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout = timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=timeout)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)
        self.meta = False

    @classmethod
    def simulated(cls, size):
        """Rank 0 of a ring of `size` for the meta device: exchanges allocate the received buffers only."""
        ring = cls.__new__(cls)
        ring.group, ring.rank, ring.size, ring.meta = None, 0, size, True
        ring.timeout = datetime.timedelta(seconds=0)
        ring.next = ring.prev = 0
        return ring

    def wait(self, works, what):
        for work in works:
            try:
                ok = work.wait(self.timeout)
            except RuntimeError as exc:
                raise ContextParallelError(
                    f"context parallel: rank {self.rank} of {self.size}, {what}: {' '.join(str(exc).split())[:300]} "
                    f"(a rank failed, was killed or took longer than the timeout, {self.timeout.total_seconds():g} "
                    "s)") from exc
            if ok is False:
                raise ContextParallelError(f"context parallel: rank {self.rank} of {self.size}, {what}: timed out "
                                           f"after {self.timeout.total_seconds():g} s")

    def exchange(self, sends, recv_like, what, tag=0):
        """Send the tensors `sends` to the next rank and receive tensors shaped as `recv_like` ((shape, dtype) pairs)
        from the previous one; started at once, returns (pending, received): finish(pending) before reading."""
        received = [torch.empty(shape, dtype=dtype, device=sends[0].device) for shape, dtype in recv_like]
        if self.meta or self.size == 1:
            return [], received
        import torch.distributed as dist

        sends = [t.contiguous() for t in sends]   # (kept alive with the pending works)
        works = [dist.isend(t, self.next, group=self.group, tag=tag + i) for i, t in enumerate(sends)]
        works += [dist.irecv(t, self.prev, group=self.group, tag=tag + i) for i, t in enumerate(received)]
        return (works, what, sends), received

    def finish(self, pending):
        if pending:
            self.wait(*pending[:2])


class RingPlan:
    """The ring's blocks for a sequence of n positions: each rank's chunks, local offsets and lengths."""

    def __init__(self, n, ring, piece_rows=2048):
        self.n, self.ring = n, ring
        self.piece_rows = piece_rows   # a non-causal block of at least this many rows runs its backward in pieces
        self.chunks = [shard_chunks(n, ring.size, r) for r in range(ring.size)]
        self.lengths = [sum(b - a for a, b in c) for c in self.chunks]

    def blocks(self, q_rank, k_rank, window):
        """(query rows (i0, i1) local to q_rank, key rows (j0, j1) local to k_rank, global key start, options) for
        every block of q_rank's queries against k_rank's keys that sees a key (module docstring). options: causal,
        window, key_limit_value (None, or the last key every row may see: the causal bound lifted)."""
        out = []
        q_off = 0
        for qa, qb in self.chunks[q_rank]:
            n = qb - qa
            k_off = 0
            for ka, kb in self.chunks[k_rank]:
                m = kb - ka
                if n and m:
                    if ka == qa:
                        out.append(((q_off, q_off + n), (k_off, k_off + m), ka, (True, window, None)))
                    elif kb <= qa:
                        if window is None:
                            out.append(((q_off, q_off + n), (k_off, k_off + m), ka, (False, None, None)))
                        else:
                            # query i (position qa + i) sees key j (position ka + j) iff qa + i - ka - j < W; rows past
                            # W - (qa - ka) + m - 1 see none. The kernel's window reads i + (m - rows) - j < W'.
                            d = qa - ka
                            rows = min(n, window - d + m - 1)
                            if rows > 0:
                                out.append(((q_off, q_off + rows), (k_off, k_off + m), ka,
                                            (True, window - d + m - rows, m - 1)))
                k_off += m
            q_off += n
        return out


def _pack(k, v):
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(buf, k_shape, v_shape):
    nk = k_shape.numel()
    return buf[:nk].view(k_shape), buf[nk:nk + v_shape.numel()].view(v_shape)


def _shapes(k, v, length):
    return (torch.Size(k.shape[:2] + (length,) + k.shape[3:]), torch.Size(v.shape[:2] + (length,) + v.shape[3:]))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries over every rank's keys (module docstring). q (B, H, n_r, D), k, v
    (B, Hkv, n_r, D) of this rank's positions; kpm: (B, N) bool key padding mask of all positions or None."""

    @staticmethod
    def forward(ctx, q, k, v, plan, kpm, scale, window, softcap, rule, backend):
        ring = plan.ring
        acc = _acc_dtype(q.dtype)
        B, H, n, D = q.shape
        o = torch.zeros((B, H, n, v.shape[3]), dtype=acc, device=q.device)
        lse = torch.full((B, H, n), float("-inf"), dtype=acc, device=q.device)
        buf, src = _pack(k, v), ring.rank
        for step in range(ring.size):
            pending = None
            if step < ring.size - 1:
                nxt = (src - 1) % ring.size
                pending, (incoming,) = ring.exchange([buf], [((_numel(k, v, plan.lengths[nxt]),), buf.dtype)],
                                                     f"forward, step {step + 1}")
            kc, vc = _unpack(buf, *_shapes(k, v, plan.lengths[src]))
            for (i0, i1), (j0, j1), ka, (causal, win, limit) in plan.blocks(ring.rank, src, window):
                o_b, l_b = attention_fwd_op(q[:, :, i0:i1], kc[:, :, j0:j1], vc[:, :, j0:j1],
                                            None if kpm is None else kpm[:, ka:ka + j1 - j0], causal, float(scale),
                                            int(win or 0), float(softcap or 0.0), rule, backend, None,
                                            _limit(q, B, i1 - i0, limit), None)
                l_b = l_b.to(acc)
                merge_block(o[:, :, i0:i1], lse[:, :, i0:i1], o_b, l_b.masked_fill(torch.isinf(l_b), float("-inf")))
            kc = vc = o_b = l_b = None   # (views of the buffer that goes)
            if pending is not None:
                ring.finish(pending)
                buf, src = incoming, nxt
                pending = incoming = None   # (the sent buffer goes)
        empty = lse == float("-inf")
        o = o.masked_fill_(empty[..., None], 0.0).to(q.dtype)
        lse = lse.masked_fill_(empty, float("inf")).float()
        ctx.save_for_backward(q, k, v, o, lse, kpm)
        ctx.options = (plan, scale, window, softcap, rule, backend)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm = ctx.saved_tensors
        plan, scale, window, softcap, rule, backend = ctx.options
        ring = plan.ring
        acc = _acc_dtype(q.dtype)
        B = q.shape[0]
        delta = _rowsum_product(do, o, acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        buf, src = _pack(k, v), ring.rank
        dbuf = torch.zeros(buf.shape, dtype=acc, device=q.device)
        for step in range(ring.size):
            last = step == ring.size - 1
            if not last:   # the keys and values travel ahead; the accumulators once this step has added to them
                nxt = (src - 1) % ring.size
                size = _numel(k, v, plan.lengths[nxt])
                pending, (incoming,) = ring.exchange([buf], [((size,), buf.dtype)], f"backward, step {step + 1}")
            kc, vc = _unpack(buf, *_shapes(k, v, plan.lengths[src]))
            dkc, dvc = _unpack(dbuf, *_shapes(k, v, plan.lengths[src]))
            for (i0, i1), (j0, j1), ka, (causal, win, limit) in plan.blocks(ring.rank, src, window):
                for r0, r1 in _row_pieces(i0, i1, causal, plan.piece_rows):
                    # (a causal block runs whole: its causal bound and window are read against its own rows)
                    dq_b, dk_b, dv_b = attention_bwd_op(
                        do[:, :, r0:r1], q[:, :, r0:r1], kc[:, :, j0:j1], vc[:, :, j0:j1], o[:, :, r0:r1],
                        lse[:, :, r0:r1], None if kpm is None else kpm[:, ka:ka + j1 - j0], causal, float(scale),
                        int(win or 0), float(softcap or 0.0), rule, backend, None,
                        _limit(q, B, r1 - r0, limit), None, delta[:, :, r0:r1])
                    dq[:, :, r0:r1] += dq_b
                    dkc[:, :, j0:j1] += dk_b
                    dvc[:, :, j0:j1] += dv_b
                    dq_b = dk_b = dv_b = None
            if not last:
                ring.finish(pending)      # the keys and values sent: this step's buffer can go before dK, dV travel
                buf = kc = vc = pending = None
                pending_d, (dincoming,) = ring.exchange([dbuf], [((size,), acc)], f"backward, step {step + 1}",
                                                     tag=1)
                ring.finish(pending_d)
                dkc = dvc = None                           # (views of the accumulators that go)
                buf, dbuf, src = incoming, dincoming, nxt
                pending_d = incoming = dincoming = None   # (the sent accumulators go)
        buf = kc = vc = dkc = dvc = None
        home = dbuf
        if ring.size > 1:   # the accumulators held now are rank r + 1's: one more step brings each home
            pending, (home,) = ring.exchange([dbuf], [((_numel(k, v, plan.lengths[ring.rank]),), acc)],
                                            "backward, returning dK and dV", tag=1)
            ring.finish(pending)
            del pending, dbuf
        dk, dv = (t.to(like.dtype) for t, like in zip(_unpack(home, k.shape, v.shape), (k, v)))
        del home    # (before dQ's cast: the peak of the backward is its loop, not its end)
        return dq.to(q.dtype), dk, dv, None, None, None, None, None, None, None


def _rowsum_product(do, o, acc, rows=1 << 12):
    """(B, H, n) float32 rowsum(dO * O), `rows` rows at a time: no full-size copies of dO and O in `acc`."""
    delta = torch.empty(o.shape[:3], dtype=torch.float32, device=o.device)
    for i in range(0, o.shape[2], rows):
        delta[:, :, i:i + rows] = (do[:, :, i:i + rows].to(acc) * o[:, :, i:i + rows].to(acc)).sum(-1)
    return delta


def _numel(k, v, length):
    return sum(s.numel() for s in _shapes(k, v, length))


def _row_pieces(i0, i1, whole, min_rows, pieces=4):
    """The query rows [i0, i1) of a block's backward in up to `pieces` runs (its dQ made a piece at a time: a
    quarter of the block's dQ temporary), or whole (a causal block, or fewer than `min_rows` rows)."""
    n = i1 - i0
    if whole or n < min_rows:
        return [(i0, i1)]
    step = -(-n // pieces)
    return [(a, min(a + step, i1)) for a in range(i0, i1, step)]


def _limit(q, batch, rows, value):
    """The (B, rows) key_limit that lifts the causal bound (every key up to `value` visible), or None."""
    if value is None:
        return None
    return torch.full((batch, rows), value, dtype=torch.int32, device=q.device)


def ring_attention(q, k, v, plan, *, key_padding_mask=None, scale, window=None, softcap=None, rule="grad",
                   backend=None):
    """This rank's (B, H, n_r, D) attention output over all ranks' keys (RingAttention)."""
    return RingAttention.apply(q, k, v, plan, key_padding_mask, scale, window, softcap, rule, backend or "auto")
