"""Where a --model name points (attnlrp_fast/hub.py): a folder, the HF cache or the hub; an unknown name fails at once,
with a "did you mean", offline or when the hub does not answer."""

import time

import pytest

from attnlrp_fast import hub
from cli_helpers import one_line_error, run_cli


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_mistyped_model_fails_at_once_offline(doc, capsys, offline):
    t = time.perf_counter()
    rc, _, err = run_cli(["explain", "--model", "tyni", "--document", doc, "--quiet"], capsys)
    one_line_error(rc, err, "--model tyni", "nor a model in the Hugging Face cache", "only while the hub answers",
                   "HF_HUB_OFFLINE is set", "did you mean tiny?")
    rc, _, err = run_cli(["estimate", "--model", "llama-9"], capsys)
    one_line_error(rc, err, "no model config at 'llama-9'", "did you mean llama-3.1-8b or llama-3.1-70b?")
    assert time.perf_counter() - t < 20


def test_without_an_answer_from_the_hub_it_fails_at_once_too(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")   # nothing listens there
    hub._no_answer.cache_clear()
    try:
        t = time.perf_counter()
        with pytest.raises(ValueError, match="http://127.0.0.1:9 does not answer"):
            hub.from_pretrained_options("nobody/no-such-model")
        assert time.perf_counter() - t < hub.REACH_SECONDS + 1
    finally:
        hub._no_answer.cache_clear()


def test_a_hub_id_is_still_tried_when_the_hub_answers(monkeypatch, doc, capsys):
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    asked = []

    def from_pretrained(name, **kw):
        asked.append(name)
        raise OSError("nobody/no-such-model is not a valid model identifier")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", from_pretrained)
    rc, _, err = run_cli(["explain", "--model", "nobody/no-such-model", "--document", doc, "--quiet"], capsys)
    one_line_error(rc, err, "the hub did not give it", "not a valid model identifier")
    assert asked == ["nobody/no-such-model"]


def test_a_cached_model_loads_offline_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "models--someone--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    assert hub.from_pretrained_options("someone/tiny-llama") == {"local_files_only": True}
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    assert hub.from_pretrained_options("someone/tiny-llama") == {}
    assert hub.did_you_mean("someone/tiny-lama") == " (did you mean someone/tiny-llama?)"
    assert hub.did_you_mean("something else entirely") == ""
