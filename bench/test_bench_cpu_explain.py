"""pytest-benchmark suite: one AttnLRP explanation on CPU, attnlrp-fast against the LXT-style approach and the same
rules on eager attention (bench/cpu_explain.py records the full comparison, with peak memory, into JSON).

    OMP_NUM_THREADS=2 TRITON_INTERPRET=0 python -m pytest bench/test_bench_cpu_explain.py \\
        --benchmark-json=bench/results/pytest-benchmark-cpu.json
    python -m pytest bench/test_bench_cpu_explain.py --benchmark-disable -q     # each runs once (the test suite)
"""

import os

import pytest
import torch

if __package__:   # imported as bench.<module> (the tests)
    from . import cpu_explain
else:             # run as a script: its folder is sys.path[0]
    import cpu_explain

N = int(os.environ.get("CPU_EXPLAIN_N", "1024"))


@pytest.mark.parametrize("method", cpu_explain.METHODS)
def test_cpu_explanation(benchmark, method):
    explain = cpu_explain._explainer(method, N)
    ids = torch.randint(0, cpu_explain.SHAPE["vocab_size"], (1, N), generator=torch.Generator().manual_seed(N))
    explain(ids[:, :64])
    relevance = benchmark(explain, ids)
    assert relevance.shape == (1, N) and torch.isfinite(relevance).all()
