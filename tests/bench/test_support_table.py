"""The support table (bench/SUPPORT.md, bench/support.json) is true: every causal-LM and seq2seq architecture of
the installed transformers, built tiny and explained again, ends as the table says, and none crashes."""

import json
import os

import pytest

from bench import support_table

TABLE = os.path.join(os.path.dirname(support_table.__file__), "support.json")


def _sample(table):
    """The architectures checked in the suite: every refused one and every 6th of the others (by name); all of them
    with ATTNLRP_FAST_SUPPORT_FULL=1 (4 minutes on 2 cores: each architecture is built in a fresh worker)."""
    if os.environ.get("ATTNLRP_FAST_SUPPORT_FULL") == "1":
        return None
    rows = sorted(table["rows"], key=lambda r: r["model_type"])
    refused = [r["model_type"] for r in rows if r["status"] == "refused"]
    others = [r["model_type"] for r in rows if r["status"] != "refused"]
    return set(refused) | set(others[::6])


@pytest.mark.slow
def test_support_table_is_true():
    import transformers
    with open(TABLE) as f:
        table = json.load(f)
    if table["meta"]["transformers"] != transformers.__version__:
        pytest.skip(f"the table is for transformers {table['meta']['transformers']}, this is {transformers.__version__}")
    types = _sample(table)
    rows = support_table.run(types=types, processes=2, timeout=300)
    now = {r["model_type"]: r["status"] for r in rows}
    then = {r["model_type"]: r["status"] for r in table["rows"]}
    assert types is None or set(now) == types
    assert {"explains", "refused", "unbuilt"} <= set(now.values())
    assert not [t for t, s in now.items() if s == "crash"], [r for r in rows if r["status"] == "crash"]
    changed = {t: (then.get(t), s) for t, s in now.items() if then.get(t) != s}
    assert not changed, f"the table says otherwise for (table, now): {changed}; regenerate it"
    if types is None:
        assert support_table.summary(rows) == table["summary"]


def test_table_markdown_counts_every_row():
    rows = [{"model_type": "a", "kind": "causal-lm", "status": "explains", "reason": ""},
            {"model_type": "b", "kind": "seq2seq", "status": "refused", "reason": "UnsupportedModelError: x | y"},
            {"model_type": "c", "kind": "causal-lm", "status": "unbuilt", "reason": "needs a checkpoint"}]
    md = support_table.markdown(rows, {"transformers": "9.9", "date": "2026-12-02"})
    assert "**1 of 2 built architectures explain (50 %), 1 are refused, 0 crash**; 1 could not be built." in md
    assert "x \\| y" in md and md.count("\n| ") == 1 + 3
