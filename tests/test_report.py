"""Reports: sentence and paragraph aggregation, HTML escaping and self-containment, JSON, terminal summary."""

import json

import pytest

from attnlrp_fast import report

PIECES = ["The", " cat", " sat", ".", " It", " was", " <b>happy</b>", "!", "\n\n", "Dogs", " bark", "."]
REL = [0.1, 2.0, 0.5, 0.0, -0.3, 0.2, 1.0, 0.0, 0.0, -1.0, 0.4, 0.1]


def test_sentences_and_paragraphs_sum_token_relevance():
    sents = report.segments(PIECES, REL, "sentence")
    assert [s.text for s in sents] == ["The cat sat.", "It was <b>happy</b>!", "Dogs bark."]
    assert [round(s.relevance, 6) for s in sents] == [2.6, 0.9, -0.5]
    paras = report.segments(PIECES, REL, "paragraph")
    assert [p.text for p in paras] == ["The cat sat. It was <b>happy</b>!", "Dogs bark."]
    assert sum(p.relevance for p in paras) == pytest.approx(sum(REL))
    top = report.top_segments(sents, k=2)
    assert top[0][0].text == "The cat sat." and top[0][1] == pytest.approx(2.6 / 3.5)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="12 token pieces but 3 relevance values"):
        report.segments(PIECES, REL[:3])


def test_html_is_escaped_and_self_contained(tmp_path):
    json_path, html_path = report.write_reports(tmp_path, PIECES, REL, title="t <x>", model="tiny", rule="attnlrp")
    page = html_path.read_text()
    assert "<b>happy</b>" not in page and "&lt;b&gt;happy&lt;/b&gt;" in page
    assert "t &lt;x&gt;" in page and "<script" not in page and "http" not in page
    assert 'title="2"' in page  # value on hover
    assert "rgba(214, 39, 40, 1.000)" in page and "rgba(31, 119, 180, 0.500)" in page  # diverging scale
    data = json.loads(json_path.read_text())
    assert data["tokens"] == PIECES and data["relevance"] == REL and data["model"] == "tiny"
    assert len(data["sentences"]) == 3 and len(data["paragraphs"]) == 2


def test_summary_lines():
    lines = report.summary(PIECES, REL, k=2)
    assert lines[0] == "top sentences:" and "74.3%" in lines[1] and "The cat sat." in lines[1]
    assert "top paragraphs:" in lines
