"""Test setup: Triton's interpreter on machines without CUDA (set before anything imports Triton), one share of the
cores per pytest-xdist worker, and the markers: `gpu` (needs CUDA, skipped without it) and `slow` (the wide grids,
trainings, interpreter sweeps and subprocess runs: part of the whole suite, left out by `-m "not slow"`, the inner
loop).

Tests mirror the source tree: tests/kernels, bindings, core, models, evaluation, integrations, app, bench, and
project (layers, packaging, the README). Shared pieces live here at the top: helpers.py (attention inputs, the
float64 oracle, tolerances), tiny_models.py (tiny random HF models of each family), tiny_lm.py (a local causal LM
folder with a tokenizer), explicit_rules.py / explicit_llama.py (the paper's rules written out), and
device_run_helpers.py (the benchmark harness)."""

import os

# pytest-xdist workers (-n K) share the machine: each takes cpu_count / K threads unless OMP_NUM_THREADS says otherwise
# (set before torch is imported; the subprocesses tests start inherit it).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# SmolLM2 (attnlrp_fast/smollm2.py) is dequantized once into a cache folder shared by the run's workers (and kept
# between runs, like the user's own cache); the tests of the first load use a fresh folder of their own.
os.environ.setdefault("ATTNLRP_FAST_CACHE", os.path.join(__import__("tempfile").gettempdir(), "attnlrp-fast-test-cache"))

# explain() on CPU hands freed blocks back to the system (attnlrp_fast/host_memory.py: resident memory = live tensors,
# at 15-30 % more time in page faults); the tests of that start processes of their own without this, the rest of the
# suite keeps malloc's own settings, for time.
os.environ.setdefault("ATTNLRP_FAST_MALLOC", "keep")

if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

# the package first: from the checkout's root it makes an installed `kernels` distribution (which transformers 5.25
# on imports) win over the repository's kernels/ folder (attnlrp_fast/__init__.py, _InstalledKernelsFirst)
import attnlrp_fast  # noqa: E402,F401
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny local causal LM folder with a BPE tokenizer and a chat template (tiny_lm.make_local_lm)."""
    from tiny_lm import make_local_lm

    path = tmp_path_factory.mktemp("tiny-lm")
    make_local_lm(path)
    return path


@pytest.fixture
def doc(tmp_path):
    """tiny_lm.DOC as a UTF-8 file."""
    from tiny_lm import DOC

    p = tmp_path / "doc.txt"
    p.write_text(DOC, encoding="utf-8")
    return p


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: part of the whole suite; -m 'not slow' leaves it out (the inner loop)")


# The files that take longest (minutes of the whole suite on 2 cores) run first: with pytest-xdist's --dist loadfile
# the others then fill in around them, instead of one worker finishing a long file alone at the end.
LONGEST_FIRST = ("core/test_smollm2.py", "project/test_readme.py", "bench/test_device_run.py",
                 "evaluation/test_needle.py", "kernels/test_attention_kernels.py",
                 "models/test_families.py", "bindings/test_attention_segments.py", "bench/test_compile_check.py")


def pytest_collection_modifyitems(config, items):
    import torch

    def rank(item):
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)   # stable: each file's tests stay together and in order
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
