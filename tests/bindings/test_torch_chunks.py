"""The torch path's chunked attention (python_bindings/torch_path.py: softcaps, segment ids, key limits, relative
biases, float64 windows): query rows in chunks, each on the band of keys any of its rows may see, against the
float64 oracle under every rule; small chunks (7 rows) so that bands overlap and no length is a multiple of one."""

import pytest
import torch

from attnlrp_fast.bindings import torch_path
from attnlrp_fast.reference import attention_dense
from helpers import TOL, assert_close_all, dense_reference, make_qkv, rel_err

CASES = {
    "causal_window_softcap": dict(N=53, M=53, kw={"causal": True, "window": 9, "softcap": 1.5}),
    "window_both_sides": dict(N=41, M=47, kw={"window": 6}),
    "cache_softcap_padding": dict(N=30, M=61, kw={"causal": True, "softcap": 2.0}, padding=True),
    "more_rows_than_keys": dict(N=50, M=23, kw={"causal": True, "window": 5, "softcap": 3.0}),
    "key_limit": dict(N=45, M=45, kw={"causal": True}, limit=True),
    "segments_window": dict(N=39, M=39, kw={"causal": True, "window": 11}, segments=True),
    "relative_bias": dict(N=33, M=33, kw={"causal": True}, rel_bias=True),
}


def _inputs(name, dtype, g):
    c = CASES[name]
    N, M = c["N"], c["M"]
    q, k, v = make_qkv(2, 6, 2, N, M, 16, dtype, generator=g)
    do = torch.randn(2, 6, N, 16, generator=g).to(dtype)
    kw = dict(c["kw"], scale=0.35)
    if c.get("padding"):
        kpm = torch.rand(2, M, generator=g) > 0.25
        kpm[0, : M // 2] = False
        kpm[1, :] = False                           # a batch row that sees nothing
        kw["key_padding_mask"] = kpm
    if c.get("limit"):                              # an image block [12, 30) seen whole from inside it
        lim = (torch.arange(N) + M - N).expand(2, N).clone()
        lim[:, 12:30] = 29
        lim[1, :4] = -1                              # rows that see no key
        kw["key_limit"] = lim
    if c.get("segments"):
        ids = torch.zeros(2, M, dtype=torch.int64)
        ids[0, 17:] = 1
        ids[1, 5:] = 4
        ids[1, 30:] = 2
        kw["segment_ids"] = ids
    if c.get("rel_bias"):
        kw["rel_bias"] = torch.randn(6, N + M - 1, generator=g)
    return q, k, v, do, kw


@pytest.mark.parametrize("rule", ["grad", "attnlrp", "cp"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_path_matches_float64(name, rule, dtype):
    g = torch.Generator().manual_seed(hash((name, rule, str(dtype))) % 2**31)
    q, k, v, do, kw = _inputs(name, dtype, g)
    o, lse = torch_path.attention_fwd_torch(q, k, v, chunk=7, **{k_: x for k_, x in kw.items()})
    grads = torch_path.attention_bwd_torch(do, q, k, v, o, lse, rule=rule, chunk=7, **kw)
    ref = dense_reference(q, k, v, do, rule=rule, **kw)
    tol = 1e-6 if dtype == torch.float64 else TOL[dtype]    # (the log-sum-exp the backward takes is float32)
    assert_close_all((o, *grads), ref, tol, f"{name} {rule} {dtype}")
    _, ref_lse = attention_dense(q.double(), k.double(), v.double(), return_lse=True, **kw)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("inf")).all()
    assert rel_err(lse[finite], ref_lse[finite]) < 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_chunk_bands_hold_every_visible_key(name):
    """Each chunk's key band holds every key one of its rows may see (so nothing is lost by computing the band
    alone), and rows whose band is empty see no key."""
    q, k, v, do, kw = _inputs(name, torch.float32, torch.Generator().manual_seed(1))
    B, H, N, _ = q.shape
    M = k.shape[2]
    vis = torch_path.visible_keys(range(N), N, M, causal=kw.get("causal", False), window=kw.get("window"),
                                  segment_ids=kw.get("segment_ids"), key_limit=kw.get("key_limit"))
    vis = vis.expand(B, 1, N, M)[:, 0]
    rows = 0
    for i0, i1, k0, k1 in torch_path._chunks(B, H, N, M, 7, kw.get("causal", False), kw.get("window"),
                                             kw.get("key_limit")):
        rows += i1 - i0
        band = torch.zeros(M, dtype=torch.bool)
        band[max(k0, 0):max(k1, k0)] = True
        assert not (vis[:, i0:i1] & ~band).any(), (i0, i1, k0, k1)
    assert rows == N
