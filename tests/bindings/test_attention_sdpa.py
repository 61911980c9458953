"""The torch path on torch's fused SDPA kernels (python_bindings/sdpa.py) and the per-call choice between it and the
Triton kernels (dispatch.attention_choice, the measured dispatch table).

Without a GPU: the CUDA adapters run against the real aten schemas and meta kernels (shapes, dtypes, argument
lists), and against CPU stand-ins that follow each CUDA kernel's contract (flash: GQA, no mask; memory-efficient: a
bias, no GQA, its log-sum-exp padded to 32 rows) to check the segments, GQA and padding handling against float64. The
choice is checked on tensor specs of CUDA tensors. `gpu` tests run the real kernels on CUDA against float64."""

import json
from types import SimpleNamespace

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.bindings import dispatch, dispatch_table, sdpa
from attnlrp_fast.reference import attention_dense
from helpers import TOL, assert_close_all, dense_reference, make_qkv, rel_err, run_attention

CPU_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# --- CPU stand-ins for the CUDA kernels, each enforcing its kernel's contract -----------------------------------------
def _flash(q, k, v, dropout_p, causal, return_debug_mask, *, scale):
    assert dropout_p == 0.0 and not return_debug_mask
    o, lse = CPU_FWD(q, k, v, 0.0, causal, scale=scale)
    rng = torch.empty(2, dtype=torch.int64)
    return o, lse, None, None, q.shape[2], k.shape[2], rng, torch.empty(0), torch.empty(0)


def _flash_backward(do, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, dropout_p, causal, seed, offset, *, scale):
    assert cum_q is None and cum_k is None and (max_q, max_k) == (q.shape[2], k.shape[2]) and dropout_p == 0.0
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32 and lse.is_contiguous()
    return CPU_BWD(do, q, k, v, o, lse, 0.0, causal, scale=scale)


def _efficient(q, k, v, bias, compute_lse, dropout_p, causal, *, scale):
    assert q.shape[1] == k.shape[1], "the memory-efficient kernel takes no GQA"
    assert compute_lse and dropout_p == 0.0
    if bias is not None:
        assert bias.dtype == q.dtype and bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        assert bias.stride(-1) == 1 and bias.stride(1) == bias.stride(2) == 0, "a broadcast bias, never N x M"
    o, lse = CPU_FWD(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    rows = -(-q.shape[2] // 32) * 32
    padded = torch.full(q.shape[:2] + (rows,), float("nan"))     # what lies past N must never be read
    padded[:, :, : q.shape[2]] = lse
    return o, padded, torch.empty(()), torch.empty(())


def _efficient_backward(do, q, k, v, bias, o, lse, seed, offset, dropout_p, grad_mask, causal, *, scale):
    assert q.shape[1] == k.shape[1] and lse.shape[-1] % 32 == 0 and lse.shape[-1] >= q.shape[2]
    assert list(grad_mask) == [True, True, True, False]
    dq, dk, dv = CPU_BWD(do, q, k, v, o, lse[:, :, : q.shape[2]].contiguous(), 0.0, causal, attn_mask=bias,
                         scale=scale)
    return dq, dk, dv, None


def _cudnn(q, k, v, bias, compute_lse, dropout_p, causal, return_debug_mask, *, scale):
    assert q.shape[1] == k.shape[1] and bias is None and compute_lse and dropout_p == 0.0
    o, lse = CPU_FWD(q, k, v, 0.0, causal, scale=scale)
    return o, lse[..., None], None, None, q.shape[2], k.shape[2], torch.empty(()), torch.empty(()), None


def _cudnn_backward(do, q, k, v, o, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, dropout_p, causal, *, scale):
    assert q.shape[1] == k.shape[1] and bias is None and cum_q is None and cum_k is None
    assert lse.shape == q.shape[:3] + (1,) and (max_q, max_k) == (q.shape[2], k.shape[2])
    return CPU_BWD(do, q, k, v, o, lse[..., 0], 0.0, causal, scale=scale)


STAND_INS = SimpleNamespace(_scaled_dot_product_cudnn_attention=_cudnn,
                            _scaled_dot_product_cudnn_attention_backward=_cudnn_backward,_scaled_dot_product_flash_attention=_flash,
                            _scaled_dot_product_flash_attention_backward=_flash_backward,
                            _scaled_dot_product_efficient_attention=_efficient,
                            _scaled_dot_product_efficient_attention_backward=_efficient_backward)


def _sdpa_path(q, k, v, do, kpm, causal, rule, scale):
    o, lse = sdpa.attention_fwd(q, k, v, kpm, causal=causal, scale=scale)
    return (o, lse, *sdpa.attention_bwd(do, q, k, v, o, lse, kpm, causal=causal, scale=scale, rule=rule))


@pytest.mark.parametrize("rule", ["grad", "attnlrp", "cp"])
@pytest.mark.parametrize("kind", ["flash", "cudnn", "efficient"])
@pytest.mark.parametrize("N,M,causal,padding", [
    (45, 71, True, False),      # a cache: two key segments merged by log-sum-exp
    (70, 31, True, False),      # N > M: the first N - M queries see nothing
    (1, 77, True, False),       # decode: one query sees every key, one call
    (33, 33, False, False),
    (45, 71, True, True),       # key padding: the memory-efficient kernel
    (33, 40, False, True),
])
def test_cuda_adapters_against_float64_with_stand_in_kernels(kind, rule, N, M, causal, padding, monkeypatch):
    if padding and kind != "efficient":
        pytest.skip("padded calls go to the memory-efficient kernel")
    monkeypatch.setattr(sdpa, "_aten", STAND_INS)
    monkeypatch.setattr(sdpa, "kernel_name", lambda *a, **kw: kind)
    g = torch.Generator().manual_seed(N * 1000 + M + (7 if padding else 0))
    q, k, v = make_qkv(3, 6, 2, N, M, 16, generator=g)
    do = torch.randn(3, 6, N, 16, generator=g)
    kpm = None
    if padding:
        kpm = torch.rand(3, M, generator=g) > 0.3
        kpm[0, : M // 2] = False          # left padding
        kpm[1] = False                    # nothing to see at all
    o, lse, *grads = _sdpa_path(q, k, v, do, kpm, causal, rule, 0.3)
    ref = dense_reference(q, k, v, do, causal=causal, key_padding_mask=kpm, rule=rule, scale=0.3)
    assert_close_all((o, *grads), ref, TOL[torch.float32], f"{kind} {rule} {N} {M}")
    _, ref_lse = attention_dense(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=kpm, scale=0.3,
                                 return_lse=True)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("inf")).all()
    assert rel_err(lse[finite], ref_lse[finite]) < 1e-6 and lse.dtype == torch.float32
    if padding:
        assert (o[1] == 0).all() and all((x[1] == 0).all() for x in grads[:1])


@pytest.mark.parametrize("N,M,causal,window,padding,dtype", [
    (97, 97, True, 13, False, torch.float32),     # 97 rows in bands of 23: no multiple of anything
    (45, 71, True, 20, True, torch.float32),      # a cache, left padding and a batch row that sees nothing
    (70, 31, True, 9, False, torch.float32),      # N > M: the first rows see no key at all
    (61, 61, False, 7, True, torch.float32),      # both sides of the diagonal
    (40, 40, True, 1, False, torch.float16),      # each row sees itself alone
    (50, 50, True, 1000, False, torch.float32),   # a window that cuts nothing: the unwindowed call
])
@pytest.mark.parametrize("rule", ["grad", "attnlrp", "cp"])
def test_windows_in_row_bands_match_float64(N, M, causal, window, padding, dtype, rule, monkeypatch):
    """A sliding window on CPU: torch's fused kernel on bands of rows with their keys' band masks; small bands so
    that many overlap."""
    monkeypatch.setattr(sdpa, "BAND_ELEMENTS", 23 * (23 + window))
    rows, reach = sdpa.band_rows(N, M, window, causal), (window if causal else 2 * window - 1)
    assert rows * (rows + reach) <= sdpa.BAND_ELEMENTS < (rows + 1) * (rows + 1 + reach) or rows in (16, N)
    g = torch.Generator().manual_seed(N * 31 + M + window)
    q, k, v = make_qkv(2, 6, 2, N, M, 16, dtype, generator=g)
    do = torch.randn(2, 6, N, 16, generator=g).to(dtype)
    kpm = None
    if padding:
        kpm = torch.rand(2, M, generator=g) > 0.2
        kpm[0, : M // 3] = False
        kpm[1, :] = False
    kw = dict(causal=causal, scale=0.3, window=window)
    o, lse = sdpa.attention_fwd(q, k, v, kpm, **kw)
    grads = sdpa.attention_bwd(do, q, k, v, o, lse, kpm, rule=rule, **kw)
    ref = dense_reference(q, k, v, do, key_padding_mask=kpm, rule=rule, **kw)
    assert_close_all((o, *grads), ref, TOL[dtype], f"window {window} {rule} {N} {M}")
    _, ref_lse = attention_dense(q.double(), k.double(), v.double(), key_padding_mask=kpm, return_lse=True, **kw)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("inf")).all()
    assert rel_err(lse[finite], ref_lse[finite]) < 1e-6
    assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in grads)


def test_window_bands_cover_exactly_the_visible_keys():
    """Every visible (row, key) pair lies in its row's band, and each band starts and ends on a visible key."""
    for N, M, causal, window in ((97, 97, True, 13), (45, 71, True, 20), (70, 31, True, 9), (61, 61, False, 7),
                                 (33, 80, False, 50)):
        qpos = torch.arange(N)[:, None] + M - N
        kpos = torch.arange(M)[None]
        vis = (qpos - kpos < window) & ((kpos <= qpos) if causal else (kpos - qpos < window))
        rows = 0
        for i0, i1, k0, k1 in sdpa.window_bands(N, M, causal, window, 11):
            rows += i1 - i0
            assert not vis[i0:i1, :max(k0, 0)].any() and not vis[i0:i1, max(k1, k0):].any()
            if k1 > k0:
                assert vis[i0:i1, k0].any() and vis[i0:i1, k1 - 1].any()
            else:
                assert not vis[i0:i1].any()
        assert rows == N


def test_segments():
    assert sdpa.segments(5, 9, False) == [(0, 0, 9, False)]
    assert sdpa.segments(1, 9, True) == [(0, 0, 9, False)]          # one query: nothing to hide
    assert sdpa.segments(9, 9, True) == [(0, 0, 9, True)]
    assert sdpa.segments(4, 9, True) == [(0, 0, 5, False), (0, 5, 9, True)]
    assert sdpa.segments(9, 4, True) == [(5, 0, 4, True)]


@pytest.mark.parametrize("kind,padding,causal,N,M", [("flash", False, True, 100, 130), ("flash", False, False, 7, 7),
                                                      ("cudnn", False, True, 100, 130),
                                                      ("efficient", True, True, 100, 130),
                                                      ("efficient", True, False, 1, 40)])
def test_cuda_adapters_fit_the_real_aten_schemas(kind, padding, causal, N, M, monkeypatch):
    """The real ops' schemas and meta kernels: argument lists, shapes and dtypes of every call the adapters make."""
    monkeypatch.setattr(sdpa, "kernel_name", lambda *a, **kw: kind)
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, do = torch.empty(2, 8, N, 64, **meta), torch.empty(2, 8, N, 64, **meta)
    k, v = torch.empty(2, 2, M, 64, **meta), torch.empty(2, 2, M, 64, **meta)
    kpm = torch.empty(2, M, device="meta", dtype=torch.bool) if padding else None
    o, lse = sdpa.attention_fwd(q, k, v, kpm, causal=causal, scale=0.125)
    assert o.shape == q.shape and o.dtype == torch.bfloat16 and lse.shape == (2, 8, N) and lse.dtype == torch.float32
    for rule in ("grad", "attnlrp"):
        dq, dk, dv = sdpa.attention_bwd(do, q, k, v, o, lse, kpm, causal=causal, scale=0.125, rule=rule)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
        assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16


def test_kernel_names_and_what_the_fused_kernels_cannot_express():
    q, k, _ = make_qkv(1, 4, 2, 8, 8, 16)
    assert sdpa.kernel_name(q) == "cpu" and sdpa.unsupported(q, k) is None
    assert sdpa.unsupported(q, k, window=4) is None and "softcap" in sdpa.unsupported(q, k, softcap=5.0)
    assert "float64" in sdpa.unsupported(q.double(), k.double(), window=4)
    assert "segment ids" in sdpa.unsupported(q, k, segment_ids=torch.zeros(1, 8, dtype=torch.int64))
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=(1, 4, 8, 16))
    assert "window" in sdpa.unsupported(cuda, k, window=4)
    assert sdpa.kernel_name(cuda) == "flash" and sdpa.kernel_name(cuda, torch.ones(1, 8)) == "efficient"
    assert sdpa.kernel_name(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)) == "efficient"


@pytest.mark.parametrize("chosen,kind", [(1, "flash"), (2, "efficient"), (3, "cudnn"), (0, "flash"), (-1, "flash")])
def test_the_kernel_is_the_one_torch_s_own_sdpa_would_pick(chosen, kind, monkeypatch):
    """On CUDA the kernel follows torch._fused_sdp_choice (what F.scaled_dot_product_attention runs, so the baseline
    and the explanation share it); math or an error leaves the fixed rule; GQA and causality are passed on."""
    seen = []
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **kw: seen.append((a, kw)) or chosen)
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, torch.bfloat16)
    cuda_q = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=q.shape)
    assert sdpa.kernel_name(cuda_q, None, k, v, causal=True) == kind
    assert seen[0][1] == {"enable_gqa": True} and seen[0][0][5] is True
    assert sdpa.kernel_name(cuda_q, torch.ones(1, 8, dtype=torch.bool), k, v) == "efficient"


# --- the choice on CUDA (tensor specs: nothing is allocated) -----------------------------------------------------
@pytest.fixture
def cuda_spec(monkeypatch, tmp_path):
    """A Hopper GPU as far as the choice can tell, and no dispatch table unless a test writes one."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(dispatch_table, "packaged_path", lambda: tmp_path / "absent.json")
    monkeypatch.delenv(dispatch_table.ENV, raising=False)

    def spec(N=4096, M=None, D=128, H=32, Hkv=8, dtype=torch.bfloat16):
        device = torch.device("cuda")
        return (dispatch.TensorSpec((1, H, N, D), dtype, device),
                dispatch.TensorSpec((1, Hkv, M or N, D), dtype, device))
    return spec


def _table(tmp_path, monkeypatch, **fields):
    table = {"schema": 1, "device": "NVIDIA H200", "capability": "9.0", "date": "2026-12-02", "source": "x.json",
             "forward": "hopper", "dq": "atomic", "gated_out": {}, "cases": [], **fields}
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(dispatch_table.ENV, str(path))
    return path


def test_without_a_table_cuda_takes_sdpa_where_it_can_and_triton_where_only_it_can(cuda_spec):
    q, k = cuda_spec()
    plain = dispatch.attention_choice(q, k, causal=True, rule="attnlrp")
    assert plain.path == "torch" and "flash" in plain.engine and "no dispatch table" in plain.reason
    padded = dispatch.attention_choice(q, k, causal=True, key_padding_mask=object())
    assert padded.path == "torch" and "efficient" in padded.engine
    for kw, why in (({"softcap": 50.0}, "softcap"), ({"window": 4096}, "window"),
                    ({"segment_ids": object()}, "segment ids"), ({"key_limit": object()}, "key limits"),
                    ({"rule": "cp"}, "dV only")):
        choice = dispatch.attention_choice(q, k, causal=True, **kw)
        assert choice.path == "triton" and why in choice.reason and choice.forward is None, kw
    odd = dispatch.attention_choice(*cuda_spec(D=100))
    assert odd.path == "triton" and "multiple of 8" in odd.reason
    assert dispatch.attention_choice(*cuda_spec(dtype=torch.float32)).engine == "torch SDPA (efficient kernel)"
    forced = dispatch.attention_choice(q, k, softcap=50.0, backend="torch")
    assert forced.path == "torch" and forced.engine == "torch, in query chunks" and "softcap" in forced.reason


def test_a_measured_table_decides_per_case_and_names_the_forward(cuda_spec, tmp_path, monkeypatch):
    cases = [{"features": "causal", "dtype": "bfloat16", "head_dim": 128, "bucket": 16384, "path": "triton",
              "ms": {"sdpa": 2.0, "triton": 1.5}},
             {"features": "causal", "dtype": "bfloat16", "head_dim": 128, "bucket": 1024, "path": "sdpa",
              "ms": {"sdpa": 0.2, "triton": 0.3}}]
    cases.append({"features": "decode", "dtype": "bfloat16", "head_dim": 128, "bucket": 65536, "path": "triton",
                  "ms": {"sdpa": 0.09, "triton": 0.05}})
    _table(tmp_path, monkeypatch, cases=cases)
    decode = dispatch.attention_choice(*cuda_spec(N=1, M=131072), causal=True)
    assert decode.path == "triton" and "65536 tokens" in decode.reason
    assert dispatch.attention_choice(*cuda_spec(N=1, M=131072), causal=True, key_padding_mask=object()).path == "torch"
    long = dispatch.attention_choice(*cuda_spec(N=32768), causal=True)
    assert (long.path, long.forward, long.dq) == ("triton", "hopper", "atomic")
    monkeypatch.setenv("ATTNLRP_FAST_DQ", "separate")         # an explicit setting wins over the table's
    assert dispatch.attention_choice(*cuda_spec(N=32768), causal=True).dq is None
    monkeypatch.delenv("ATTNLRP_FAST_DQ")
    assert "16384 tokens" in long.reason and "triton 1.5 ms" in long.reason
    short = dispatch.attention_choice(*cuda_spec(N=900), causal=True)
    assert short.path == "torch" and "1024 tokens" in short.reason
    other = dispatch.attention_choice(*cuda_spec(D=64), causal=True)
    assert other.path == "torch" and "no such case" in other.reason
    softcap = dispatch.attention_choice(*cuda_spec(), causal=True, softcap=30.0)
    assert softcap.path == "triton" and softcap.forward == "hopper"


def test_a_gated_out_sdpa_path_and_another_gpu_s_table(cuda_spec, tmp_path, monkeypatch):
    _table(tmp_path, monkeypatch, forward="tma", gated_out={"sdpa": "dq off by 3e-1", "hopper": "timed out",
                                                            "decode": "o off by 1e-1"})
    choice = dispatch.attention_choice(*cuda_spec(), causal=True)
    assert choice.path == "triton" and choice.forward == "tma" and "dq off by 3e-1" in choice.reason
    assert choice.exclude == ("decode", "hopper")
    _table(tmp_path, monkeypatch, capability="8.0", device="NVIDIA A100")
    choice = dispatch.attention_choice(*cuda_spec(), causal=True)
    assert choice.path == "torch" and "NVIDIA A100" in choice.reason


def test_table_errors_name_the_problem(tmp_path, monkeypatch):
    good = json.loads(_table(tmp_path, monkeypatch).read_text())
    assert dispatch_table.validate_table(good) is good
    for change, message in (({"schema": 2}, "schema must be 1"), ({"forward": "fast"}, "'forward' must be one of"),
                            ({"gated_out": {"hopper": "x"}}, "gated-out"),
                            ({"gated_out": {"dq=atomic": "x"}}, "dQ mode 'atomic' is gated out"),
                            ({"gated_out": {"warp": "x"}}, "'gated_out' must map"),
                            ({"cases": [{"features": "causal", "dtype": "bfloat16", "head_dim": 128, "bucket": 0,
                                         "path": "cudnn"}]}, "case 0: bucket 0; path 'cudnn'")):
        with pytest.raises(ValueError, match=message):
            dispatch_table.validate_table({**good, **change})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv(dispatch_table.ENV, str(bad))
    with pytest.raises(ValueError, match="bad.json: not readable JSON"):
        dispatch_table.load_table()
    monkeypatch.setenv(dispatch_table.ENV, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.json: no such dispatch table"):
        dispatch_table.load_table()


def test_the_shipped_table_if_any_is_valid():
    path = dispatch_table.packaged_path()
    if path.exists():
        dispatch_table.validate_table(json.loads(path.read_text()), str(path))
    assert path.parent.name == "data" and path.parent.parent.name == "attnlrp_fast"


def test_info_says_where_each_case_runs(capsys):
    from attnlrp_fast.app import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "dispatch table:" in out and "attention on cpu tensors" in out
    assert out.count("->") >= len(dispatch.INFO_CASES) + 1 and "logit softcap 50" in out


# --- on a GPU ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["grad", "attnlrp", "cp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("N,M,causal,padding", [(1000, 1037, True, False), (1037, 1000, True, False),
                                                (1, 4097, True, False), (700, 700, False, False),
                                                (1000, 1037, True, True)])
def test_gpu_sdpa_path_matches_float64(dtype, rule, N, M, causal, padding):
    g = torch.Generator().manual_seed(N + M)
    q, k, v = make_qkv(2, 8, 2, N, M, 128, dtype, device="cuda", layout="bnhd", generator=g)
    do = torch.randn(2, 8, N, 128, generator=g).to("cuda", dtype)
    kw = {"causal": causal, "rule": rule}
    if padding:
        kw["key_padding_mask"] = (torch.rand(2, M, generator=g) > 0.2).cuda()
    outs = run_attention(af.attention, q, k, v, do, backend="torch", **kw)
    assert_close_all(outs, dense_reference(q, k, v, do, **kw), TOL[dtype], f"sdpa {dtype} {rule} {N} {M}")


@pytest.mark.gpu
def test_gpu_sdpa_auto_choice_runs_where_it_says():
    q, k, v = make_qkv(1, 8, 2, 300, 300, 64, torch.bfloat16, device="cuda")
    assert dispatch.attention_choice(q, k, causal=True).path in ("torch", "triton")
    assert dispatch.attention_choice(q, k, causal=True, softcap=20.0).path == "triton"
    outs = run_attention(af.attention, q, k, v, torch.randn_like(q), causal=True, rule="attnlrp")
    assert all(torch.isfinite(x).all() for x in outs)


def test_the_triton_forward_auto_takes_tma_and_hopper_only_when_preferred(monkeypatch):
    """On a GPU, 'auto' runs the descriptor forward ('tma') unless the caller (the dispatch table) prefers another;
    a preferred variant these tensors cannot take falls back."""
    from attnlrp_fast.kernels import attention_fwd as fwd

    refused = set()
    monkeypatch.setattr(fwd, "interpreting", lambda: False)
    monkeypatch.setattr(fwd, "descriptor_path_unsupported",
                        lambda q, k, v, kpm=None, warp_specialize=False:
                        "refused" if ("hopper" if warp_specialize else "tma") in refused else None)
    monkeypatch.delenv("ATTNLRP_FAST_FWD", raising=False)
    q, k, v = make_qkv(1, 2, 1, 64, 64, 16, torch.float16)
    assert fwd.forward_variant(q, k, v) == "tma"
    assert fwd.forward_variant(q, k, v, prefer="hopper") == "hopper"
    assert fwd.forward_variant(q, k, v, prefer="portable") == "portable"
    refused.add("hopper")
    assert fwd.forward_variant(q, k, v, prefer="hopper") == "tma"
    refused.add("tma")
    assert fwd.forward_variant(q, k, v, prefer="hopper") == "portable"
    with pytest.raises(ValueError, match="cannot run here: refused"):
        fwd.forward_variant(q, k, v, variant="tma")
    refused.clear()
    assert fwd.forward_variant(q, k, v, prefer="hopper", exclude=("hopper",)) == "tma"   # a gated-out variant
    assert fwd.forward_variant(q, k, v, exclude=("tma",)) == "portable"
    long_k, long_v = make_qkv(1, 2, 1, 1, 4096, 16, torch.float16)[1:]
    assert fwd.forward_variant(q[:, :, :1], long_k, long_v) == "decode"
    assert fwd.forward_variant(q[:, :, :1], long_k, long_v, exclude=("decode",)) == "tma"
    assert fwd.forward_variant(q, k, v, variant="tma", exclude=("tma",)) == "tma"      # asked for: not auto
    with pytest.raises(ValueError, match="preferred forward variant must be one of"):
        fwd.forward_variant(q, k, v, prefer="fastest")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_key_padding_mask_view_with_any_strides(backend):
    """A (B, M) mask that is a transposed view (its keys not adjacent in memory) reads as the mask it is."""
    g = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(2, 4, 2, 37, 45, 16, generator=g)
    kpm = (torch.rand(45, 2, generator=g) > 0.3).T
    assert kpm.stride(-1) != 1
    do = torch.randn_like(q)
    outs = run_attention(af.attention, q, k, v, do, causal=True, key_padding_mask=kpm, rule="attnlrp", backend=backend)
    ref = dense_reference(q, k, v, do, causal=True, key_padding_mask=kpm, rule="attnlrp")
    assert_close_all(outs, ref, TOL[torch.float32], backend)
