"""`attnlrp-fast estimate` prints each table as soon as it is done, with a progress bar, and the same text as all at
once."""

import pytest

from attnlrp_fast import estimate as est
from attnlrp_fast.app import cli
from attnlrp_fast.app.commands import estimate as estimate_command


@pytest.fixture
def tiny_config(tmp_path):
    import transformers as tf

    from tiny_models import COMMON

    path = tmp_path / "config.json"
    path.write_text(tf.LlamaConfig(**{**COMMON, "num_hidden_layers": 5}).to_json_string())
    return str(path)


@pytest.mark.slow
def test_estimate_prints_each_table_as_it_is_done_with_a_progress_bar(tiny_config, capsys, monkeypatch):
    before = {}   # what was printed when each mode's first estimate started
    measure = est.estimate_memory

    def estimate_memory(config, tokens, **kw):
        before.setdefault(kw["mode"], capsys.readouterr())
        return measure(config, tokens, **kw)

    monkeypatch.setattr(est, "estimate_memory", estimate_memory)
    argv = ["estimate", "--model", tiny_config, "--tokens", "1k,2k", "--dtype", "float32", "--mlp-chunk", "256"]
    assert cli.main(argv) == 0
    before["end"] = capsys.readouterr()
    assert "Memory of one explanation" in before["low_memory"].out
    assert "\nlow_memory (--mlp-chunk 256)" in before["plain"].out
    assert "\nplain" in before["lxt_style"].out and "low_memory" not in before["lxt_style"].out
    assert "estimating low_memory: 2/2 lengths" in before["plain"].err and "estimating eager: 2/2" in before["end"].err
    monkeypatch.setattr(est, "estimate_memory", measure)
    all_at_once = "\n".join(estimate_command.all_lines(cli.build_parser().parse_args(argv))) + "\n"
    assert "".join(c.out for c in before.values()) == all_at_once
