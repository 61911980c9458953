"""af.explain(per_target=True): one backward pass per (position, token) target over one forward. Each target's map
equals that target explained alone, they sum to the joint map, the forward runs once, and a target that is not a
list is an error."""

import pytest
import torch

import attnlrp_fast as af
from helpers import rel_err
from tiny_models import build, inputs


@pytest.mark.parametrize("family,rule,checkpoint", [("llama", "attnlrp", False), ("qwen3", "cp", True),
                                                    ("gemma2", "attnlrp", True), ("llama", "grad", True)])
def test_each_target_map_is_that_target_alone_and_they_sum_to_the_joint_map(family, rule, checkpoint):
    model = build(family, seed=3)
    x = inputs(family, batch=2, length=13, seed=11)
    targets = [(5, 7), (9, 3), (-1, 20)]
    kw = dict(rule=rule, backend="torch", checkpoint=checkpoint)
    events = []
    e = af.explain(model, **x, target=targets, per_target=True, progress=events.append, **kw)
    assert e.target_relevance.shape == (2, len(targets), 13) and e.target_relevance.dtype == torch.float32
    for j, target in enumerate(targets):
        alone = af.explain(model, **x, target=[target], **kw)
        assert rel_err(e.target_relevance[:, j], alone.relevance) < 1e-5, (j, target)
        assert torch.allclose(e.target_logits[:, j], alone.target_logit, atol=1e-5)
    joint = af.explain(model, **x, target=targets, **kw)
    assert rel_err(e.relevance, joint.relevance) < 1e-5 and joint.target_relevance is None
    assert rel_err(e.target_relevance.sum(1), e.relevance) < 1e-5
    layers = len(model.model.layers)
    # one forward (a checkpointed layer's recomputation in a backward is not reported), one backward per target
    assert events.count("forward") == layers
    assert events.count("backward") == layers * len(targets) and events.count("target") == len(targets)


def test_per_target_needs_a_list_of_targets():
    model = build("llama")
    x = inputs("llama", batch=1)
    for target in (None, 7, af.contrast(3, 4), lambda out: out.logits[:, -1, 3]):
        with pytest.raises(ValueError, match="per_target=True needs a list"):
            af.explain(model, **x, target=target, per_target=True)
    with pytest.raises(ValueError, match="per_target=True needs a list"):
        af.explain(model, **x, target=[(9, 3)], per_target=True, reasoning_span=(4, 8))
