"""Every kernel family compiles for Hopper (sm_90) with Triton's real compiler and ptxas, without a GPU, through the
JIT's own specialisation (bench/compile_check.py): the interpreter that runs the other tests accepts code the
compiler rejects, and says nothing about what the GPU will run. One compile of the quick set serves every test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "bench" / "compile_check.py"
ENV = {**os.environ, "TRITON_INTERPRET": "0"}

pytestmark = pytest.mark.slow   # a minute of compiling (three with an empty Triton cache)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "quick.json"
    proc = subprocess.run([sys.executable, str(CHECK), "--quick", "--resources", "--json", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert ", 0 failed" in proc.stdout
    return json.loads(out.read_text())


def _variants(result, kernel, **constexprs):
    return [v for v in result["variants"] if v["kernel"] == kernel
            and all(v["constexprs"].get(k) == x for k, x in constexprs.items())]


def test_every_kernel_family_compiles(quick):
    assert not quick["failures"] and quick["arch"] == 90
    kernels = {v["kernel"] for v in quick["variants"]}
    assert kernels == {"attention_fwd_kernel", "attention_fwd_tma_kernel", "attention_decode_kernel",
                       "attention_decode_merge_kernel", "attention_bwd_delta_kernel",
                       "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel", "norm_fwd_kernel", "norm_bwd_kernel",
                       "act_fwd_kernel", "act_bwd_kernel"}
    assert all(v["shared"] <= 232448 for v in quick["variants"])


def test_the_checked_binary_is_the_jits(quick):
    """The forward the GPU runs for an HF-layout bf16 model (GQA 32/8, D = 128, causal): strides and sizes marked
    divisible by 16 and the unit strides folded into constants, as the JIT does; so the loads are vectorised and the
    loop is software-pipelined: the K/V copies of the next blocks are in flight (async_wait keeps >= 1 pending) and
    shared memory holds the Q tile plus num_stages buffers of K and V."""
    (fwd,) = _variants(quick, "attention_fwd_kernel", HEAD_DIM=128, IS_CAUSAL=True, HAS_KPM=False)
    assert {"stride_qn", "stride_kn", "stride_vb", "N", "M", "Q", "K"} <= set(fwd["divisible_by_16"])
    assert not {"stride_qd", "stride_kd", "stride_vd", "stride_od"} & set(fwd["in_signature"])
    c, stages = fwd["constexprs"], fwd["options"]["num_stages"]
    tile_bytes = c["BLOCK_N"] * c["BLOCK_D"] * 2
    assert stages >= 2 and fwd["pipeline"] >= 1
    assert fwd["shared"] >= c["BLOCK_M"] * c["BLOCK_D"] * 2 + stages * 2 * tile_bytes
    assert fwd["mma"] == "HGMMA" and fwd["stack"] == 0


def test_no_matrix_product_is_computed_twice(quick):
    """Every product of every attention loop runs on Hopper's warpgroup MMA, and each wgmma group, over the
    warpgroups that run it, computes exactly one tile product: an iteration issues its FLOP minimum (half
    precision, head dims up to 128: the model shapes)."""
    checked = 0
    for v in quick["variants"]:
        if v["kernel"].startswith("attention") and v["kernel"] != "attention_bwd_delta_kernel" \
                and v["constexprs"]["HEAD_DIM"] <= 128 and v["mma"] == "HGMMA":
            assert v["mma_per_tile"] == [1.0], (v["label"], v["kernel"], v["mma_per_tile"])
            found, expected = map(int, v["mma_products"].split("/"))   # a multiple with two loops (unmasked, masked)
            assert found and found % expected == 0, (v["label"], v["kernel"], v["mma_products"])
            checked += 1
    assert checked >= 12   # forwards, dK/dV (each rule, each dQ mode) and dQ at D = 128


def test_backward_tiles_own_128_rows(quick):
    """dK/dV programs own 128 keys and dQ programs 128 queries on 8 warps (one 64-row half per warpgroup); nothing
    spills at D = 128 in bf16."""
    for kernel, own in (("attention_bwd_dkdv_kernel", "BLOCK_N"), ("attention_bwd_dq_kernel", "BLOCK_M")):
        for v in _variants(quick, kernel, HEAD_DIM=128, IS_CAUSAL=True, HAS_KPM=False):
            assert v["constexprs"][own] == 128 and v["options"]["num_warps"] == 8, v["label"]


def test_warp_specialised_forward_when_triton_has_it(quick):
    from attnlrp_fast.kernels.attention_fwd import WARP_SPECIALIZED_TRITON

    version = tuple(int(x) for x in quick["triton"].split(".")[:2])
    ws = _variants(quick, "attention_fwd_tma_kernel", WARP_SPECIALIZE=True)
    if version != WARP_SPECIALIZED_TRITON:
        assert not ws   # the launcher refuses it there; the check does not compile it
        pytest.skip(f"the warp-specialised forward compiles with Triton {WARP_SPECIALIZED_TRITON} (this is "
                    f"{quick['triton']}): bench/NOTES.md has its figures")
    for v in ws:   # a producer warpgroup and two consumers: 12 warps
        assert v["warps"] == 12 and v["mma_per_tile"] == [1.0] and v["stack"] == 0


def test_bad_arguments_are_one_line():
    proc = subprocess.run([sys.executable, str(CHECK), "--quick", "--only", "no such kernel"], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "matches no variant" in proc.stderr
    proc = subprocess.run([sys.executable, str(CHECK), "--config", "{not json"], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--config" in proc.stderr
