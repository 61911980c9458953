"""Shared pieces of the attention tests: inputs and the tolerances; running the engine and the float64 oracle and
the relative error come from attnlrp_fast.selfcheck (written once for the tests and every self-check)."""

import torch

from attnlrp_fast.selfcheck import OUTPUTS, dense_reference, rel_err, run_attention  # noqa: F401 (re-exported)

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def make_qkv(B, H, Hkv, N, M, D, dtype=torch.float32, device="cpu", layout="bhnd", generator=None):
    """Fresh random q, k, v. layout "bnhd" gives the (B, N, H, D).transpose(1, 2) views HF passes."""
    def one(h, n):
        if layout == "bnhd":
            return torch.randn(B, n, h, D, generator=generator).to(device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(B, h, n, D, generator=generator).to(device=device, dtype=dtype)

    return one(H, N), one(Hkv, M), one(Hkv, M)


def assert_close_all(outs, refs, tol, what=""):
    errs = {n: rel_err(a, b) for n, a, b in zip(OUTPUTS, outs, refs)}
    bad = {n: e for n, e in errs.items() if not e < tol}   # inf (non-finite output) is never below tol
    assert not bad, f"{what}: relative errors over {tol}: {bad}"


def explanation_peak(model, n, seed=0, **explain_kw):
    """The peak of live tensor bytes (estimate.LiveBytes) of a real CPU explanation of n random tokens by `model`
    (parameters frozen, the rules patched in before the count, as weights are), to set against af.estimate_memory."""
    import attnlrp_fast as af
    from attnlrp_fast.estimate import LiveBytes

    for p in model.parameters():
        p.requires_grad_(False)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))
    handle = af.lrp(model, backend="torch")
    try:
        with LiveBytes() as meter:
            af.explain(model, input_ids=ids, **explain_kw)
    finally:
        handle.remove()
    return meter.peak
