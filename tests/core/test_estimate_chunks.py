"""af.estimate_memory stands in for the middle MLP chunks of a layer (the same numbers as running every chunk, faster
at long lengths) and puts the seam back for real tensors."""

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast import estimate as est
from attnlrp_fast.memory import LowMemoryHandle
from tiny_models import build


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("n, chunk", [(150, 16), (161, 32), (96, 8)])
def test_standing_in_for_the_middle_chunks_changes_no_number(family, n, chunk, monkeypatch):
    config = build(family).config
    every = est.estimate_memory(config, n, dtype=torch.float32, mlp_chunk=chunk, exact=True)
    stood_in = []
    apply = est.StoodInChunk.apply
    monkeypatch.setattr(est.StoodInChunk, "apply", lambda *a: stood_in.append(1) or apply(*a))
    fast = est.estimate_memory(config, n, dtype=torch.float32, mlp_chunk=chunk)
    assert stood_in   # (3 passes over each layer's middle chunks)
    assert (fast.peak, fast.where, fast.largest) == (every.peak, every.where, every.largest)


def test_the_chunk_seam_is_put_back_and_real_tensors_run_every_chunk():
    before = LowMemoryHandle.__dict__["_chunk"]
    est.estimate_memory(build("llama").config, 100, dtype=torch.float32, mlp_chunk=16)
    assert LowMemoryHandle.__dict__["_chunk"] is before
    model = build("llama")
    ids = torch.randint(3, 50, (1, 70), generator=torch.Generator().manual_seed(0))
    whole = af.explain(model, input_ids=ids, backend="torch")
    with est._stood_in_chunks(True):   # only meta tensors are stood in for
        chunked = af.explain(model, input_ids=ids, backend="torch", checkpoint=True, mlp_chunk=8)
    torch.testing.assert_close(chunked.relevance, whole.relevance, rtol=1e-4, atol=1e-5)
