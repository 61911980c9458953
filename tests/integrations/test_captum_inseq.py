"""attnlrp_fast.integrations: the Captum attribution class (alone and inside LLMGradientAttribution) and the Inseq
method "attnlrp", each against af.explain of the same score on a tiny random Llama (float32, CPU, torch backend),
different from plain gradient x input, and the model restored after each call."""

import subprocess
import sys

import pytest
import torch
import transformers as tf

import attnlrp_fast as af
from attnlrp_fast.bindings.hf import BACKEND_ATTR, RULE_ATTR
from attnlrp_fast.integrations import check_causal_lm
from attnlrp_fast.lrp_patch import active_handle
from attnlrp_fast.selfcheck import rel_err
from tiny_lm import make_tokenizer
from tiny_models import COMMON, build, inputs

TOL = 1e-5
PROMPT, ANSWER = "The reservoir was built", " in 1931 after"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat=False)


@pytest.fixture(scope="module")
def llama(tokenizer):
    torch.manual_seed(0)
    config = tf.LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _state(model, ids):
    """What an attribution must leave as it found: forwards, hooks, attention routing, handle, logits."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return logits, model.config._attn_implementation, sum(len(m._forward_hooks) for m in model.modules())


def _assert_restored(model, ids, before):
    logits, attn, hooks = before
    assert active_handle(model) is None
    assert model.config._attn_implementation == attn != "attnlrp_fast"
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(hasattr(m, RULE_ATTR) or hasattr(m, BACKEND_ATTR) for m in model.modules())
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, logits)


def _log_prob(token_id):
    return lambda out: out.logits[:, -1].float().log_softmax(-1)[:, token_id]


def test_importing_the_package_and_the_integrations_imports_neither_captum_nor_inseq():
    code = ("import sys, attnlrp_fast, attnlrp_fast.integrations as i; "
            "assert callable(i.llm_attribution) and callable(i.register_inseq); "
            "print(sorted(m for m in ('captum', 'inseq') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_missing_package_is_named_with_its_install_command(monkeypatch):
    import attnlrp_fast.integrations as integrations

    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "inseq", None)
    with pytest.raises(ImportError, match="pip install captum==0.9.0"):
        integrations.AttnLRPAttribution
    with pytest.raises(ImportError, match="pip install .*inseq==0.7.1"):
        integrations.register_inseq()


def test_non_causal_lms_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="not a HuggingFace causal LM"):
        check_causal_lm(build("bert_mlm"))
    with pytest.raises(TypeError, match="causal LM"):
        check_causal_lm(lambda ids: ids)


def test_captum_llm_attribution_is_af_explain_of_each_target_log_prob(llama, tokenizer):
    captum = pytest.importorskip("captum.attr", reason="captum not installed (pip install captum==0.9.0 --no-deps)")
    from attnlrp_fast.integrations import llm_attribution

    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    answer = tokenizer.encode(ANSWER, add_special_tokens=False)
    before = _state(llama, prompt)
    res = llm_attribution(llama, tokenizer, backend="torch").attribute(captum.TextTokenInput(PROMPT, tokenizer),
                                                                       target=ANSWER)
    _assert_restored(llama, prompt, before)
    assert res.token_attr.shape == (len(answer), prompt.shape[1])
    # Captum's target: log p(answer[k] | prompt, answer[:k]); its relevance of the prompt tokens
    refs = []
    for k, token in enumerate(answer):
        ids = torch.cat([prompt, torch.tensor([answer[:k]], dtype=torch.long)], 1)
        e = af.explain(llama, input_ids=ids, target=_log_prob(token), backend="torch")
        refs.append(e.relevance[0, :prompt.shape[1]])
        assert rel_err(res.token_attr[k], refs[-1]) < TOL, k
    assert rel_err(res.seq_attr, torch.stack(refs).sum(0)) < TOL
    # the same by hand: gradient x input of the summed log-probs under af.lrp, one forward per target token
    with af.lrp(llama, backend="torch"):
        total = 0
        for k, token in enumerate(answer):
            ids = torch.cat([prompt, torch.tensor([answer[:k]], dtype=torch.long)], 1)
            emb = llama.get_input_embeddings()(ids).detach().requires_grad_(True)
            out = llama(inputs_embeds=emb, use_cache=False)
            (g,) = torch.autograd.grad(out.logits[:, -1].log_softmax(-1)[0, token], emb)
            total = total + (emb * g).sum(-1)[0, :prompt.shape[1]]
    assert rel_err(res.seq_attr, total) < TOL
    plain = captum.LLMGradientAttribution(captum.LayerGradientXActivation(llama, llama.get_input_embeddings()),
                                          tokenizer).attribute(captum.TextTokenInput(PROMPT, tokenizer), target=ANSWER)
    assert rel_err(plain.token_attr, res.token_attr) > 1e-2   # AttnLRP is not plain gradient x input


def test_captum_alone_is_af_explain_of_the_last_logit(llama):
    pytest.importorskip("captum", reason="captum not installed (pip install captum==0.9.0 --no-deps)")
    from captum.attr import LayerGradientXActivation

    from attnlrp_fast.integrations import AttnLRPAttribution

    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([5, 77])
    before = _state(llama, ids)
    for rule in ("attnlrp", "cp"):
        attr = AttnLRPAttribution(llama, rule, backend="torch").attribute(ids, target=targets)
        assert attr.shape == (2, 9, llama.config.hidden_size)
        ref = af.explain(llama, input_ids=ids, target=targets, rule=rule, backend="torch").relevance
        assert rel_err(attr.sum(-1), ref) < TOL, rule
        _assert_restored(llama, ids, before)
    plain = LayerGradientXActivation(lambda x: llama(x).logits[:, -1], llama.get_input_embeddings())
    assert rel_err(plain.attribute(ids, target=targets).sum(-1), ref) > 1e-2
    # inside an active af.lrp of the same rule it is used (and left in place); another rule is an error
    with af.lrp(llama, "cp", backend="torch") as handle:
        attr = AttnLRPAttribution(llama, "cp").attribute(ids, target=targets)
        assert active_handle(llama) is handle
        with pytest.raises(ValueError, match="inside af.lrp"):
            AttnLRPAttribution(llama, "attnlrp").attribute(ids, target=targets)
    assert rel_err(attr.sum(-1), ref) < TOL
    _assert_restored(llama, ids, before)
    left_padded = torch.ones(2, 9, dtype=torch.long)
    left_padded[0, :3] = 0
    attr = AttnLRPAttribution(llama, backend="torch").attribute(ids, target=targets,
                                                                additional_forward_args=(left_padded,))
    ref = af.explain(llama, input_ids=ids, attention_mask=left_padded, target=targets, backend="torch").relevance
    assert rel_err(attr.sum(-1), ref) < TOL
    right_padded = torch.ones(2, 9, dtype=torch.long)
    right_padded[1, -2:] = 0
    with pytest.raises(ValueError, match="ends in padding"):
        AttnLRPAttribution(llama).attribute(ids, target=targets, additional_forward_args=(right_padded,))
    with pytest.raises(ValueError, match="rule must be one of"):
        AttnLRPAttribution(llama, "lrp")


def test_captum_alone_takes_the_identity_rule_on_a_final_logit_softcap():
    pytest.importorskip("captum", reason="captum not installed (pip install captum==0.9.0 --no-deps)")
    from attnlrp_fast.integrations import AttnLRPAttribution

    model = build("gemma2")
    ids = inputs("gemma2")["input_ids"]
    before = _state(model, ids)
    attr = AttnLRPAttribution(model, backend="torch").attribute(ids, target=7)
    ref = af.explain(model, input_ids=ids, target=7, backend="torch").relevance
    assert rel_err(attr.sum(-1), ref) < TOL
    assert model.config.final_logit_softcapping == 3.0 and "final_logit_softcapping" in model.config.__dict__
    _assert_restored(model, ids, before)
    # without the identity rule on the softcap (its exact derivative) the relevance would differ
    with af.lrp(model, backend="torch"):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model(inputs_embeds=emb, use_cache=False).logits[:, -1, 7].sum(), emb)
    assert rel_err((emb * g).sum(-1), ref) > 1e-3


def test_inseq_attnlrp_method_is_af_explain_of_each_step_logit(llama, tokenizer):
    inseq = pytest.importorskip("inseq", reason="inseq not installed (pip install inseq==0.7.1 --no-deps and its "
                                                "missing dependencies: see the README)")
    from attnlrp_fast.integrations import register_inseq

    assert register_inseq().method_name == "attnlrp" and "attnlrp" in inseq.list_feature_attribution_methods()
    full = tokenizer(PROMPT + ANSWER, return_tensors="pt").input_ids
    n_prompt = tokenizer(PROMPT, return_tensors="pt").input_ids.shape[1]
    steps = full.shape[1] - n_prompt
    before = _state(llama, full)
    m = inseq.load_model(llama, "attnlrp", tokenizer=tokenizer, backend="torch")
    out = m.attribute(PROMPT, PROMPT + ANSWER, attributed_fn="logit", show_progress=False)
    _assert_restored(llama, full, before)
    seq = out.sequence_attributions[0]
    assert [t.id for t in seq.target] == full[0].tolist()
    rel = seq.target_attributions   # (prefix + answer, steps): column k = relevance of the prefix at step k
    assert rel.shape == (full.shape[1], steps)
    for k in range(steps):
        ref = af.explain(llama, input_ids=full[:, :n_prompt + k], target=int(full[0, n_prompt + k]), backend="torch")
        assert rel_err(rel[:n_prompt + k, k], ref.relevance[0]) < TOL, k
        assert torch.isnan(rel[n_prompt + k:, k]).all()
    assert torch.allclose(seq.aggregate().target_attributions, rel, equal_nan=True)   # signed, not re-aggregated
    # summed over the steps: af.explain of the answer's summed logits on the whole sequence (causal model)
    answer = [(n_prompt + k - 1, int(full[0, n_prompt + k])) for k in range(steps)]
    assert rel_err(rel.nansum(1), af.explain(llama, input_ids=full, target=answer, backend="torch").relevance[0]) < TOL
    assert (rel[:n_prompt] < 0).any() and (rel[:n_prompt] > 0).any()
    # Inseq's default target, the probability of the step's token
    prob = m.attribute(PROMPT, PROMPT + ANSWER, show_progress=False).sequence_attributions[0].target_attributions
    token = int(full[0, n_prompt])
    ref = af.explain(llama, input_ids=full[:, :n_prompt], target=lambda out: out.logits[:, -1].softmax(-1)[:, token],
                     backend="torch")
    assert rel_err(prob[:n_prompt, 0], ref.relevance[0]) < TOL
    plain = inseq.load_model(llama, "layer_gradient_x_activation", tokenizer=tokenizer)
    grad_x_in = plain.attribute(PROMPT, PROMPT + ANSWER, attributed_fn="logit", show_progress=False)
    grad_x_in = grad_x_in.sequence_attributions[0].target_attributions.sum(-1)
    assert rel_err(grad_x_in[:n_prompt, 0], rel[:n_prompt, 0]) > 1e-2
    cp = inseq.load_model(llama, "attnlrp", tokenizer=tokenizer, rule="cp", backend="torch")
    cp_rel = cp.attribute(PROMPT, PROMPT + ANSWER, attributed_fn="logit", show_progress=False)
    ref = af.explain(llama, input_ids=full[:, :n_prompt], target=int(full[0, n_prompt]), rule="cp", backend="torch")
    assert rel_err(cp_rel.sequence_attributions[0].target_attributions[:n_prompt, 0], ref.relevance[0]) < TOL
    _assert_restored(llama, full, before)
