"""Ring attention (bindings/ring.py) on 2 and 3 gloo ranks on CPU: each rank's output and gradients equal the float64
oracle's rows and key gradients of its positions, for every rule, GQA, windows across shard borders, softcaps and
padded keys; the chunk plan covers every visible pair once; a rank that dies makes the others raise."""

import datetime
import os

import pytest
import torch
from distributed import run_ranks
from helpers import dense_reference, make_qkv, rel_err

from attnlrp_fast.bindings.ring import Ring, RingPlan, ring_attention, shard_chunks, shard_positions

CASES = [
    # (world, B, H, Hkv, N, D, rule, window, softcap, padded, dtype, backend)
    (2, 1, 4, 2, 37, 16, "attnlrp", None, None, False, torch.float64, "torch"),
    (2, 2, 4, 4, 45, 16, "grad", 7, None, True, torch.float64, "torch"),
    (3, 1, 4, 2, 53, 16, "cp", None, 5.0, False, torch.float64, "torch"),
    (3, 2, 6, 2, 61, 16, "attnlrp", 12, 4.0, True, torch.float64, "torch"),
    (3, 1, 4, 2, 50, 16, "attnlrp", 9, 3.0, True, torch.float32, "triton"),
    (2, 1, 2, 1, 40, 16, "attnlrp", None, None, False, torch.float32, None),
    (3, 2, 4, 2, 70, 16, "attnlrp", 30, None, True, torch.float64, "pieces"),   # backward in row pieces
]


def _inputs(B, H, Hkv, N, D, dtype, padded, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, H, Hkv, N, N, D, dtype=dtype, generator=g)
    do = torch.randn(B, H, N, D, generator=g).to(dtype)
    kpm = None
    if padded:
        kpm = torch.ones(B, N, dtype=torch.bool)
        kpm[0, :5] = False            # left padding
        kpm[-1, N - 4:] = False       # right padding (the last row, when B > 1)
    return q, k, v, do, kpm


def _rank(rank, world, case, seed):
    import torch.distributed as dist

    _, B, H, Hkv, N, D, rule, window, softcap, padded, dtype, backend = case
    q, k, v, do, kpm = _inputs(B, H, Hkv, N, D, dtype, padded, seed)
    idx = shard_positions(N, world, rank)
    plan = RingPlan(N, Ring(dist.group.WORLD, 30), piece_rows=4 if backend == "pieces" else 2048)
    backend = "torch" if backend == "pieces" else backend
    leaves = [t[:, :, idx].detach().clone().requires_grad_() for t in (q, k, v)]
    o = ring_attention(*leaves, plan, key_padding_mask=kpm, scale=D ** -0.5, window=window, softcap=softcap,
                       rule=rule, backend=backend)
    o.backward(do[:, :, idx])
    return idx, o.detach(), *[t.grad for t in leaves]


def _ranks_cases(rank, world, cases, seeds):
    return [_rank(rank, world, case, seed) for case, seed in zip(cases, seeds)]


def _check_cases(cases):
    """Every case of one world size in one start of the ranks (starting them costs seconds)."""
    world = cases[0][0]
    seeds = [int(torch.randint(0, 2 ** 31, (1,))) for _ in cases]
    per_rank = run_ranks(_ranks_cases, world, cases, seeds)
    for i, (case, seed) in enumerate(zip(cases, seeds)):
        _, B, H, Hkv, N, D, rule, window, softcap, padded, dtype, backend = case
        q, k, v, do, kpm = _inputs(B, H, Hkv, N, D, dtype, padded, seed)
        want = dense_reference(q, k, v, do, causal=True, scale=D ** -0.5, window=window, softcap=softcap,
                               key_padding_mask=kpm, rule=rule)
        seen = torch.zeros(N, dtype=torch.long)
        tol = 1e-6 if dtype == torch.float64 else 1e-4   # (the blocks merge by their float32 LSE, as the op returns it)
        for results in per_rank:
            idx, *got = results[i]
            seen[idx] += 1
            for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
                assert a.dtype == dtype
                err = rel_err(a, b[:, :, idx])
                assert err < tol, (case, name, err)
        assert (seen == 1).all()


def test_ring_matches_oracle_on_2_ranks():
    _check_cases([c for c in CASES if c[0] == 2 and c[11] != "triton"])


@pytest.mark.slow
def test_ring_matches_oracle_on_3_ranks():
    _check_cases([c for c in CASES if c[0] == 3 and c[11] != "triton"])


@pytest.mark.slow
def test_ring_on_the_triton_kernels_matches_oracle():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend on CPU tensors needs TRITON_INTERPRET=1")
    _check_cases([c for c in CASES if c[11] == "triton"])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("window", [None, 1, 6, 40])
def test_plan_covers_every_visible_pair_once(world, window):
    """The blocks of every (query rank, key rank) pair, masks applied, cover each causal (and windowed) pair exactly
    once and no other: counted with the kernel's own reading of causal, window and key limit."""
    n = 47
    ring = Ring.simulated(world)
    plan = RingPlan(n, ring)
    count = torch.zeros(n, n, dtype=torch.long)
    for qr in range(world):
        qpos = shard_positions(n, world, qr)
        for kr in range(world):
            kpos = shard_positions(n, world, kr)
            for (i0, i1), (j0, j1), ka, (causal, win, limit) in plan.blocks(qr, kr, window):
                rows, m = i1 - i0, j1 - j0
                assert kpos[j0] == ka
                i = torch.arange(rows)[:, None]
                j = torch.arange(m)[None, :]
                shift = m - rows
                keep = torch.ones(rows, m, dtype=torch.bool)
                if causal:
                    keep &= j <= (i + shift if limit is None else torch.full_like(i, limit))
                if win:
                    keep &= (i + shift) - j < win
                    if not causal:
                        keep &= j - (i + shift) < win
                count[qpos[i0:i1][:, None].expand(rows, m)[keep], kpos[j0:j1][None, :].expand(rows, m)[keep]] += 1
    qq, kk = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    want = kk <= qq
    if window is not None:
        want &= qq - kk < window
    assert torch.equal(count, want.long())


def test_shards_are_balanced():
    for world in (2, 3, 8):
        chunks = [shard_chunks(1000, world, r) for r in range(world)]
        sizes = [sum(b - a for a, b in c) for c in chunks]
        assert max(sizes) - min(sizes) <= 2
        assert sorted(p for c in chunks for a, b in c for p in range(a, b)) == list(range(1000))
        # causal work per rank (pairs under the diagonal) within 3 % of each other
        work = [sum(sum(range(a + 1, b + 1)) for a, b in c) for c in chunks]
        assert max(work) / min(work) < 1.03


def _dies(rank, world):
    import torch.distributed as dist

    q, k, v, do, _ = _inputs(1, 2, 2, 24, 16, torch.float32, False, 0)
    idx = shard_positions(24, world, rank)
    plan = RingPlan(24, Ring(dist.group.WORLD, datetime.timedelta(seconds=5)))
    if rank == 1:
        os._exit(3)   # killed before its first exchange
    return ring_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], plan, scale=0.25, backend="torch")


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_a_dead_rank_ends_every_rank(world):
    results = run_ranks(_dies, world, timeout=90, expect_errors=True)
    assert results[1][0] == "killed"
    for r, (status, text) in enumerate(results):
        if r == 1:
            continue
        assert status == "error", (r, status)
        assert "context parallel" in text or "Connection" in text or "timed out" in text.lower(), text[-600:]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_of_a_block_takes_slices_and_delta(backend):
    """The backward op on a slice of rows (strided q, do, o and LSE, as the ring passes them) with the rows' delta
    given equals the backward of those rows alone."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend on CPU tensors needs TRITON_INTERPRET=1")
    from attnlrp_fast.bindings.attention import attention_bwd_op, attention_fwd_op

    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    q, k, v = make_qkv(1, 4, 2, 29, 29, 16, generator=g)
    do = torch.randn(1, 4, 29, 16, generator=g)
    o, lse = attention_fwd_op(q, k, v, None, True, 0.25, 0, 0.0, "attnlrp", backend, None, None, None)
    rows = slice(11, 23)
    delta = (do * o).sum(-1)
    got = attention_bwd_op(do[:, :, rows], q[:, :, rows], k, v, o[:, :, rows], lse[:, :, rows], None, True, 0.25, 0,
                           0.0, "attnlrp", backend, None, torch.full((1, 12), 0, dtype=torch.int32) + torch.arange(
                               11, 23, dtype=torch.int32), None, delta[:, :, rows])
    want = attention_bwd_op(*(t[:, :, rows].contiguous() for t in (do, q)), k, v,
                            *(t[:, :, rows].contiguous() for t in (o, lse)), None, True, 0.25, 0, 0.0, "attnlrp",
                            backend, None, torch.arange(11, 23, dtype=torch.int32)[None], None)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
