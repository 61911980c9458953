"""The package's face: it imports lightly and still registers with transformers, every public name resolves,
Explanation documents every field and its repr shows only what is set, dir(af) lists the public API and the
subpackages only."""

import dataclasses
import subprocess
import sys

import pytest
import torch

import attnlrp_fast
import attnlrp_fast as af
from tiny_models import build


def test_explanation_documents_every_field_and_shows_only_what_is_set():
    for f in dataclasses.fields(af.Explanation):
        assert f"\n    {f.name} " in af.Explanation.__doc__, f.name
    e = af.explain(build("llama"), input_ids=torch.randint(3, 50, (1, 12)), latent=["model.layers.0.mlp"])
    text = repr(e)
    assert text.startswith("Explanation(relevance=tensor(shape=(1, 12), dtype=float32), target_ids=")
    assert "latent={'model.layers.0.mlp': tensor(shape=(1, 12, 32), dtype=float32)}" in text
    assert "None" not in text and "image_" not in text and "reasoning" not in text and len(text) < 400


def test_dir_lists_the_public_api_and_the_subpackages_only():
    names = set(dir(af))
    assert not names & {"importlib", "sys", "_PUBLIC"} and not hasattr(af, "sys") and not hasattr(af, "importlib")
    assert {"app", "evaluation", "kernels", "bindings", "models"} <= names
    for name in names:
        assert getattr(af, name) is not None, name
    for name in names - set(af.__all__) - {"HF_REGISTERED"}:
        assert hasattr(getattr(af, name), "__path__"), name   # a subpackage


@pytest.mark.slow
def test_the_package_imports_lightly_and_still_registers_with_transformers():
    code = ("import sys, attnlrp_fast as af\n"
            "light = 'torch' not in sys.modules\n"
            "from transformers import AttentionInterface\n"
            "print(light, 'attnlrp_fast' in AttentionInterface._global_mapping, af.HF_REGISTERED)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "True"]


def test_the_public_names_still_resolve():
    for name in attnlrp_fast.__all__:
        assert getattr(attnlrp_fast, name) is not None, name
    from attnlrp_fast import explain, lrp

    assert explain.__module__ == "attnlrp_fast.explanation" and lrp.__module__ == "attnlrp_fast.lrp_patch"
    assert set(attnlrp_fast.__all__) <= set(dir(attnlrp_fast))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        attnlrp_fast.nonsense
