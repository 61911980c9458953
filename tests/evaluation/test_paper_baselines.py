"""The AttnLRP paper's baselines (evaluation/paper_baselines.py) against float64 references written here from their
definitions, on tiny random HF models: AtMan against forwards with the suppressed scores built by hand in an attention
function of this file, attention rollout against the dense product of the per-layer matrices, Grad x AttnRoll against
autograd through those attention weights, SmoothGrad against a plain loop of noisy gradients."""

import copy

import pytest
import torch
import transformers as tf
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from attnlrp_fast.evaluation import evaluate as ev
from attnlrp_fast.evaluation import paper_baselines as pb
from tiny_models import build

REF = "test_paper_baselines_ref64"
STATE = {"mult": None, "seen": None}      # the reference attention's multipliers (B, M) and its recorded weights


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                        **kwargs):
    """Eager attention in float64 from the definition: scores, softcap, AtMan's multipliers on the scores, the
    additive eager mask, softmax; the weights (in the autograd graph) are appended to STATE["seen"]."""
    H = query.shape[1]
    k = key.repeat_interleave(H // key.shape[1], 1).double()
    v = value.repeat_interleave(H // value.shape[1], 1).double()
    s = query.double() @ k.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if STATE["mult"] is not None:
        s = s * STATE["mult"][:, None, None, :]
    if attention_mask is not None:
        s = s + attention_mask.double()
    a = torch.softmax(s, -1)
    if STATE["seen"] is not None:
        STATE["seen"].append(a)
    return (a @ v).to(query.dtype).transpose(1, 2).contiguous(), a


tf.AttentionInterface.register(REF, reference_attention)
AttentionMaskInterface.register(REF, eager_mask)


def reference_copy(model):
    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation(REF)
    return ref


def last_logit(model, ids, mask, target, **kw):
    """(B,) logits of target (B,) at the last position (left padding: every row's last real token)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits[:, -1]
    return logits.gather(-1, target[:, None])[:, 0]


def padded(ids):
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                          # left padding
    return mask


@pytest.fixture(scope="module")
def models():
    return {name: build(name, seed=31).double() for name in ("llama", "gpt2")}


def _ids(B=2, N=11, seed=0, vocab=61):
    return torch.randint(3, vocab, (B, N), generator=torch.Generator().manual_seed(seed))


# --- AtMan -----------------------------------------------------------------------------------------------------
def similar_tokens(model, a, b, c):
    """Give tokens b and c embeddings close to token a's (cosines about 0.95 and 0.75), so that conceptual
    suppression has partial similarities to act on; returns the model (a copy)."""
    model = copy.deepcopy(model)
    w = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        u = w[a] / w[a].norm()
        for t, cos in ((b, 0.95), (c, 0.75)):
            r = torch.randn(w.shape[1], generator=g, dtype=w.dtype)
            r = r - (r @ u) * u
            w[t] = w[a].norm() * (cos * u + (1 - cos ** 2) ** 0.5 * r / r.norm())
    return model


def atman_reference(model, ids, mask, target, groups, f=0.9, kappa=0.7):
    """(B, N): for each row and group, the float64 target logit without suppression minus with the group's scores
    suppressed (and, with kappa, the scores of every real token whose cosine to a group member is >= kappa multiplied
    by 1 - f * cosine), each member getting the drop / group size."""
    ref = reference_copy(model)
    e = torch.nn.functional.normalize(ref.get_input_embeddings()(ids).detach(), dim=-1)
    B, N = ids.shape
    out = torch.zeros(B, N, dtype=torch.float64)
    with torch.no_grad():
        STATE["mult"] = None
        clean = last_logit(ref, ids, mask, target)
        for b in range(B):
            for group in groups[b]:
                mult = torch.ones(N, dtype=torch.float64)
                if kappa is not None:
                    sim = (e[b, group] @ e[b].T).amax(0)
                    hit = (sim >= kappa) & mask[b].bool()
                    mult[hit] = 1 - f * sim[hit]
                mult[group] = 1 - f
                STATE["mult"] = mult[None]
                try:
                    s = last_logit(ref, ids[b:b + 1], mask[b:b + 1], target[b:b + 1])
                finally:
                    STATE["mult"] = None
                out[b, group] = (clean[b] - s[0]) / len(group)
    return out


def _groups(mask, g):
    return [[list(range(i, min(i + g, mask.shape[1]))) for i in range(int((mask[b] == 0).sum()), mask.shape[1], g)]
            for b in range(mask.shape[0])]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_atman_is_the_score_drop_of_hand_suppressed_forwards(models, name):
    ids = _ids(N=11, seed=1)
    ids[0, 2], ids[0, 6], ids[0, 9] = 10, 11, 12                      # 11, 12 close to 10; 10 repeated in row 1
    ids[1, 4], ids[1, 8] = 10, 10
    model = similar_tokens(models[name], 10, 11, 12)
    mask = padded(ids)
    a = ev.attribute(model, ids, "atman", attention_mask=mask, options={"atman_batch": 4})
    want = atman_reference(model, ids, mask, a.target, _groups(mask, 1))
    assert a.relevance.dtype == torch.float32 and a.relevance.shape == (2, 11)
    torch.testing.assert_close(a.relevance.double(), want, rtol=1e-5, atol=1e-6)
    assert (a.relevance[1, :3] == 0).all()
    # conceptual suppression acts: without it the drops differ at the similar tokens' runs
    alone = ev.attribute(model, ids, "atman", attention_mask=mask, options={"atman_kappa": None})
    torch.testing.assert_close(alone.relevance.double(),
                               atman_reference(model, ids, mask, a.target, _groups(mask, 1), kappa=None),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone.relevance[0, [2, 6, 9]], a.relevance[0, [2, 6, 9]])


def test_atman_groups_and_the_sliding_window_softcap_family():
    """Runs of 3 tokens (the last one shorter) on Gemma-2 (logit softcap, sliding window 5 < 13 tokens)."""
    model = build("gemma2", seed=32).double()
    ids = _ids(N=13, seed=2)
    mask = padded(ids)
    a = ev.attribute(model, ids, "atman", attention_mask=mask, options={"atman_group": 3, "atman_factor": 0.8})
    want = atman_reference(model, ids, mask, a.target, _groups(mask, 3), f=0.8)
    torch.testing.assert_close(a.relevance.double(), want, rtol=1e-5, atol=1e-6)
    assert model.config._attn_implementation != pb.ATMAN_NAME


# --- attention rollout and Grad x AttnRoll ---------------------------------------------------------------------
def dense_weights(model, ids, mask, target, grad=False):
    """Every layer's float64 attention weights (B, H, N, N) from the reference attention and, with grad, the
    gradient of the summed target logits with respect to each."""
    ref = reference_copy(model)
    STATE["seen"] = []
    try:
        with torch.set_grad_enabled(grad):
            score = last_logit(ref, ids, mask, target).sum()
        weights = STATE["seen"]
    finally:
        STATE["seen"] = None
    grads = torch.autograd.grad(score, weights) if grad else None
    return [w.detach() for w in weights], grads


def rollout_reference(weights, t=-1):
    N = weights[0].shape[-1]
    eye = torch.eye(N, dtype=torch.float64)
    R = eye.expand(weights[0].shape[0], N, N)
    for a in weights:                                          # A'_l ... A'_1, the later layer on the left
        a = 0.5 * a.mean(1) + 0.5 * eye
        R = (a / a.sum(-1, keepdim=True)) @ R
    return R[:, t]


def grad_rollout_reference(weights, grads, t=-1):
    N = weights[0].shape[-1]
    R = torch.eye(N, dtype=torch.float64).expand(weights[0].shape[0], N, N)
    for a, g in zip(weights, grads):                           # from the first layer up: R = R + A_bar R
        R = R + (g * a).clamp(min=0).mean(1) @ R
    return R[:, t]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_attention_rollout_is_the_dense_product(models, name):
    model = models[name]
    ids = _ids(N=13, seed=3)
    mask = padded(ids)
    implementation = model.config._attn_implementation
    a = ev.attribute(model, ids, "attention_rollout", attention_mask=mask, backend="torch")
    assert model.config._attn_implementation == implementation
    weights, _ = dense_weights(model, ids, mask, a.target)
    want = rollout_reference(weights) * mask
    torch.testing.assert_close(a.relevance.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.relevance.sum(-1), torch.ones(2), rtol=1e-5, atol=1e-6)   # rows of A' sum to 1


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_grad_x_attnroll_is_autograd_through_the_attention_weights(models, name):
    model = models[name]
    ids = _ids(N=11, seed=4)
    mask = padded(ids)
    a = ev.attribute(model, ids, "grad_x_attnroll", attention_mask=mask, backend="torch")
    weights, grads = dense_weights(model, ids, mask, a.target, grad=True)
    want = grad_rollout_reference(weights, grads) * mask
    torch.testing.assert_close(a.relevance.double(), want, rtol=1e-5, atol=1e-7)
    # every layer checkpointed (the layers run again inside the backward): the same
    c = ev.attribute(model, ids, "grad_x_attnroll", attention_mask=mask, backend="torch", checkpoint=True)
    torch.testing.assert_close(c.relevance, a.relevance, rtol=1e-6, atol=1e-8)


def test_rollouts_from_several_target_positions_average_their_rows(models):
    model = models["llama"]
    ids = _ids(B=1, N=10, seed=5)
    target = [(6, 7), (9, 3)]
    r = ev.attribute(model, ids, "attention_rollout", target=target, backend="torch")
    g = ev.attribute(model, ids, "grad_x_attnroll", target=target, backend="torch")
    ref = reference_copy(model)
    STATE["seen"] = []
    try:
        logits = ref(input_ids=ids, use_cache=False).logits
        weights = STATE["seen"]
    finally:
        STATE["seen"] = None
    grads = torch.autograd.grad(logits[0, 6, 7] + logits[0, 9, 3], weights)
    weights = [w.detach() for w in weights]
    want = (rollout_reference(weights, 6) + rollout_reference(weights, 9)) / 2
    torch.testing.assert_close(r.relevance.double(), want, rtol=1e-5, atol=1e-7)
    want = (grad_rollout_reference(weights, grads, 6) + grad_rollout_reference(weights, grads, 9)) / 2
    torch.testing.assert_close(g.relevance.double(), want, rtol=1e-5, atol=1e-7)


# --- SmoothGrad ------------------------------------------------------------------------------------------------
def smoothgrad_reference(model, ids, mask, target, samples, noise, seed):
    """x * mean of grad f(x + eps) over the samples, eps as paper_baselines states it, by autograd in float64."""
    ref = copy.deepcopy(model).double()
    x = ref.get_input_embeddings()(ids).detach()
    real = mask.bool()[..., None]
    spread = x.masked_fill(~real, -float("inf")).amax((1, 2)) - x.masked_fill(~real, float("inf")).amin((1, 2))
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(x)
    for _ in range(samples):
        eps = torch.randn(x.shape, generator=g).double() * (noise * spread)[:, None, None]
        xe = (x + eps).requires_grad_()
        score = last_logit(ref, None, mask, target, inputs_embeds=xe).sum()
        total += torch.autograd.grad(score, xe)[0]
    return (x * total / samples).sum(-1) * mask


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_smoothgrad_is_the_mean_noisy_gradient_times_the_input(models, name):
    model = models[name]
    ids = _ids(N=9, seed=6)
    mask = padded(ids)
    a = ev.attribute(model, ids, "smoothgrad", attention_mask=mask, backend="torch", seed=3,
                     options={"smoothgrad_samples": 3, "smoothgrad_batch": 4})          # 2 rows: 2 + 1 samples a call
    want = smoothgrad_reference(model, ids, mask, a.target, 3, 0.1, 3)
    torch.testing.assert_close(a.relevance.double(), want, rtol=1e-5, atol=1e-7)
    plain = ev.attribute(model, ids, "grad_x_input", attention_mask=mask, backend="torch")
    assert not torch.allclose(a.relevance, plain.relevance)


def test_smoothgrad_without_noise_is_gradient_x_input(models):
    model = models["llama"]
    ids = _ids(N=7, seed=7)
    a = ev.attribute(model, ids, "smoothgrad", backend="torch", options={"smoothgrad_samples": 1,
                                                                           "smoothgrad_noise": 0.0})
    b = ev.attribute(model, ids, "grad_x_input", backend="torch")
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-6, atol=1e-8)


# --- the engine's backends -------------------------------------------------------------------------------------
def _rel_err(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_engine_methods_on_each_backend_in_float32(backend):
    """AtMan (without a softcap), SmoothGrad, attention rollout and Grad x AttnRoll run the engine: on each backend in
    float32 (Triton: the interpreter on CPU) they agree with the float64 references (fp32 tolerance)."""
    model = build("llama", seed=33)
    ids = _ids(N=9, seed=8)
    mask = padded(ids)
    a = ev.attribute(model, ids, "atman", attention_mask=mask, backend=backend, options={"atman_group": 2})
    assert _rel_err(a.relevance, atman_reference(model, ids, mask, a.target, _groups(mask, 2))) < 1e-4
    r = ev.attribute(model, ids, "attention_rollout", attention_mask=mask, backend=backend)
    g = ev.attribute(model, ids, "grad_x_attnroll", attention_mask=mask, backend=backend)
    s = ev.attribute(model, ids, "smoothgrad", attention_mask=mask, backend=backend, seed=1,
                     options={"smoothgrad_samples": 2})
    weights, grads = dense_weights(model, ids, mask, g.target, grad=True)
    assert _rel_err(r.relevance, rollout_reference(weights) * mask) < 1e-4
    assert _rel_err(g.relevance, grad_rollout_reference(weights, grads) * mask) < 1e-4
    assert _rel_err(s.relevance, smoothgrad_reference(model, ids, mask, s.target, 2, 0.1, 1)) < 1e-4


# --- through evaluate(), and bad options ------------------------------------------------------------------------
def test_evaluate_runs_the_paper_baselines_with_their_options(models):
    model = models["gpt2"]
    ids = _ids(N=10, seed=9)
    mask = padded(ids)
    methods = list(pb.METHODS)
    assert set(methods) <= set(ev.METHODS)
    out = ev.evaluate(model, ids, methods, attention_mask=mask, backend="torch", steps=3,
                      options={"atman_group": 2, "smoothgrad_samples": 2})
    for m in methods:
        assert out[m]["morf"][0] == pytest.approx(out[m]["lerf"][0]) and out[m]["seconds"] >= 0
    a = ev.attribute(model, ids, "atman", attention_mask=mask, options={"atman_group": 2})
    c = ev.perturbation_curves(model, ids, a.relevance, attention_mask=mask, target=a.target, steps=3)
    assert out["atman"]["abpc_per_row"] == pytest.approx(c.abpc.tolist(), rel=1e-5, abs=1e-6)
    for m in methods:
        rel = ev.attribute(model, ids, m, attention_mask=mask, backend="torch",
                           options={"smoothgrad_samples": 2}).relevance
        assert rel.dtype == torch.float32 and torch.isfinite(rel).all() and (rel[1, :3] == 0).all(), m


def test_bad_method_options_are_named(models):
    model = models["llama"]
    ids = _ids(B=1, N=5, seed=10)
    with pytest.raises(ValueError, match="unknown method option 'atman_groups'"):
        ev.attribute(model, ids, "atman", options={"atman_groups": 4})
    with pytest.raises(ValueError, match="unknown method option 'samples'"):
        ev.evaluate(model, ids, ["random"], options={"samples": 4}, steps=2)
    for bad, match in (({"atman_group": 0}, "atman_group must be a positive int"),
                       ({"atman_batch": 2.5}, "atman_batch must be a positive int"),
                       ({"smoothgrad_samples": True}, "smoothgrad_samples must be a positive int"),
                       ({"atman_factor": 1.5}, r"atman_factor must lie in \[0, 1\]"),
                       ({"atman_kappa": 2}, "atman_kappa must be a cosine"),
                       ({"smoothgrad_noise": -0.1}, "smoothgrad_noise must be a finite number")):
        with pytest.raises(ValueError, match=match):
            pb.Options.of(bad)
    with pytest.raises(TypeError, match="must be a dict"):
        pb.Options.of([("atman_group", 2)])
    assert pb.Options.of({"atman_group": 8}).changed() == {"atman_group": 8}
    with pytest.raises(ValueError, match="unknown method 'atman_rollout'"):
        ev.parse_method("atman_rollout")
    with pytest.raises(ValueError, match="backend in brackets"):
        ev.parse_method("atman[triton]")


def test_the_shipped_tasks_run_them_and_the_report_states_their_settings(tmp_path, capsys):
    from attnlrp_fast.app import cli
    from attnlrp_fast.evaluation import faithfulness
    from bench import report as bench_report

    extra = tmp_path / "f.json"
    rc = cli.main(["evaluate", "--task", "recall", "--samples", "2", "--steps", "2", "--methods",
                   ",".join(pb.METHODS), "--out", str(tmp_path / "ev"), "--json", str(extra), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    _, tables = bench_report.render(extra)
    for m in pb.METHODS:
        assert f"| recall | {m} |" in tables["faithfulness"]
    assert ("The paper baselines: AtMan suppresses one token at a time (scores x 0.1, conceptual suppression at "
            "cosine >= 0.7); SmoothGrad x input averages 16 samples of noise 0.1") in tables["faithfulness"]
    assert set(faithfulness.available_methods(torch.device("cpu"))) >= set(pb.METHODS)
    needle = [faithfulness.needle_method_options(n) for n in (1024, 8192)]
    assert [o["atman_group"] for o in needle] == [8, 64] and {o["smoothgrad_samples"] for o in needle} == {4}
    line = bench_report.baseline_settings({"method_options": {**vars(pb.Options())}}, needle[0])
    assert "AtMan suppresses runs of 8 tokens at a time" in line and "averages 4 samples" in line
