"""Test setup: Triton's interpreter on machines without CUDA (set before anything imports Triton),
markers `gpu` (needs CUDA) and `slow` (kept out of CI; run with --runslow)."""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

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


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: slower than CI allows; run with --runslow")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
