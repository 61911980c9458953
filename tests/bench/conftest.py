"""The benchmark-harness tests: each leaves the process environment as it found it."""

import os

import pytest


@pytest.fixture(autouse=True)
def _environment_restored():
    """gpu_check.main exports the dispatch table, the dQ mode and more for the steps after the gate: undo it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
