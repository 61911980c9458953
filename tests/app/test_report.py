"""Reports: sentence and paragraph aggregation, HTML escaping and self-containment, JSON, terminal summary."""

import json
import re

import pytest

from attnlrp_fast.app import report

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


def test_sentences_end_only_at_a_full_stop_before_space_or_at_a_paragraph_end():
    # a decimal point, a wrapped line and a quoted full stop: only the last two sentence ends count
    pieces = ["pH", " fell", " to", " 6", ".", "5", " at", "\n", "the", " outlet", ".\"", " Then", " it", " rose", "\n\n",
              "No", " stop", " here"]
    sents = report.segments(pieces, [1.0] * len(pieces), "sentence")
    assert [s.text for s in sents] == ['pH fell to 6.5 at\nthe outlet."', "Then it rose", "No stop here"]
    assert [(s.start, s.end) for s in sents] == [(0, 11), (11, 15), (15, 18)]
    assert [p.text for p in report.segments(pieces, [0.0] * len(pieces), "paragraph")] == [
        'pH fell to 6.5 at\nthe outlet." Then it rose', "No stop here"]


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


def test_colour_is_a_diverging_scale_clipped_at_the_scale():
    assert report.colour(0.0, 2.0) == "rgba(214, 39, 40, 0.000)"
    assert report.colour(1.0, 2.0) == "rgba(214, 39, 40, 0.500)"
    assert report.colour(-3.0, 2.0) == "rgba(31, 119, 180, 1.000)"
    assert report.colour(5.0, 0) == "rgba(214, 39, 40, 0.000)"   # a zero scale colours nothing


def test_inline_heatmap_escapes_and_scales_by_the_largest_value():
    page = report.inline_heatmap(["<q>", "b"], [-0.5, 0.25])
    assert page == ('<span title="-0.5" style="background:rgba(31, 119, 180, 1.000)">&lt;q&gt;</span> '
                    '<span title="0.25" style="background:rgba(214, 39, 40, 0.500)">b</span> ')
    assert report.inline_heatmap(["z"], [0.0]) == '<span title="0" style="background:rgba(214, 39, 40, 0.000)">z</span> '


def test_summary_lines():
    lines = report.summary(PIECES, REL, k=2)
    assert lines[0] == "top sentences (share of the document's positive relevance):"
    assert "74.3%" in lines[1] and "The cat sat." in lines[1]
    assert "top paragraphs (share of the document's positive relevance):" in lines


def test_no_top_rows_that_print_as_zero_percent():
    """Segments without positive relevance (a demo explains only some passages) are not listed as "top"."""
    pieces = ["A", " b", ".", "\n\n", "C", " d", ".", "\n\n", "E", "."]
    lines = report.summary(pieces, [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], k=5)
    assert not any(re.search(r"(?<![0-9])0\.0%", line) for line in lines)
    paragraphs = lines[lines.index("top paragraphs (share of the document's positive relevance):") + 1:]
    assert paragraphs == ["  100.0%  A b."]
    assert report.summary(["x", "."], [-1.0, 0.0])[1] == "  (none: no positive relevance in the document)"


def test_html_has_top_paragraphs_and_a_facts_table_for_people(tmp_path):
    _, html_path = report.write_reports(tmp_path, PIECES, REL, target_logit=12.345678901234, prompt_tokens=12345,
                                        relevance_question_and_template=-0.000123456789, question=None)
    page = html_path.read_text()
    assert "<h2>Most relevant sentences</h2>" in page and "<h2>Most relevant paragraphs</h2>" in page
    paragraphs = page.split("<h2>Most relevant paragraphs</h2>")[1].split("<h2>")[0]
    assert "share of the document's positive relevance" in paragraphs
    assert "<li><b>100.0%</b> (3.5): The cat sat. It was &lt;b&gt;happy&lt;/b&gt;!</li>" in paragraphs
    assert "<tr><th>Target logit (the explained score)</th><td>12.35</td></tr>" in page
    assert "<tr><th>Prompt tokens</th><td>12,345</td></tr>" in page
    assert "<th>Relevance on the question and chat template</th><td>-0.0001235</td>" in page
    assert "<tr><th>Question</th><td>-</td></tr>" in page
    assert "12.345678901234" not in page and "_" not in "".join(re.findall(r"<th>(.*?)</th>", page))


# --- plot_relevance, per-token map selector, write_reports(plot=..., maps=...) ---------------------------

import math
import shutil
import subprocess

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) from the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("values", [
    [0.7],                                                                            # N = 1
    [math.sin(i / 50) if i % 997 else float("nan") for i in range(5000)],            # NaN inside
    [0.0] * 300,                                                                      # all zero
    [float("inf"), 1.0, -2.0, float("-inf")],                                        # inf
], ids=["one", "5000-with-nan", "zeros", "inf"])
def test_plot_relevance_writes_a_png(tmp_path, values):
    path = report.plot_relevance(tmp_path / "sub" / "r.png", values, boundaries=[0, 2, 10**9],
                                 labels=[(0, "a $very$ long label text that goes on and on"), (-5, "off")])
    assert path == tmp_path / "sub" / "r.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert _png_size(path) == (1200, 400)  # 12 x 4 inches at 100 dpi


def test_plot_relevance_accepts_arrays_and_returns_the_path(tmp_path):
    np = pytest.importorskip("numpy")
    path = report.plot_relevance(str(tmp_path / "a.png"), np.linspace(-1, 1, 20_000), title="t $x")
    assert path.name == "a.png" and path.stat().st_size > 1000


def test_plot_relevance_empty_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="relevance is empty"):
        report.plot_relevance(tmp_path / "e.png", [])
    assert not (tmp_path / "e.png").exists()


def test_plot_label_is_one_short_line():
    assert report._plain_label("a\nb  c") == "a b c"
    long = report._plain_label("x" * 100)
    assert len(long) == 30 and long.endswith("...")
    assert report._plain_label("$5") == r"\$5"


MAPS = {"layer 3": [float(i) for i in range(len(PIECES))], "head </script><b> & co": [-0.5] * len(PIECES)}


def _embedded_maps(page):
    found = re.search(r'<script type="application/json" id="relevance-maps">(.*?)</script>', page, re.S)
    assert found, "no maps data block in the page"
    return json.loads(found.group(1))


def test_map_selector_lists_escaped_labels_and_embeds_the_maps():
    page = report.render_html(PIECES, REL, maps=MAPS)
    assert ('<select id="relevance-map"><option value="0">all</option><option value="1">layer 3</option>'
            '<option value="2">head &lt;/script&gt;&lt;b&gt; &amp; co</option></select>') in page
    data = _embedded_maps(page)
    assert data["maps"] == MAPS and data["labels"] == list(MAPS) and data["all"] == REL
    # the raw label never reaches the page; only the escaped forms do
    assert "</script><b>" not in page and "<b> &" not in page
    assert "\\u003c/script\\u003e\\u003cb\\u003e \\u0026 co" in page
    assert page.count("<script") == 2 and page.count("</script>") == 2 and "http" not in page
    # the script comes after the document, so that it finds the spans
    assert page.index('<div class="doc">') < page.index("<script") and page.index("<select") < page.index("<div class")
    # the "all" rendering is unchanged by the maps
    assert 'title="2"' in page and "rgba(214, 39, 40, 1.000)" in page


def test_non_finite_values_become_null_in_the_embedded_maps():
    page = report.render_html(["a", "b"], [1.0, float("nan")], maps={"m": [float("inf"), -2.0]})
    data = _embedded_maps(page)
    assert data["all"] == [1.0, None] and data["maps"] == {"m": [None, -2.0]}


def test_without_maps_the_page_has_no_script_and_is_unchanged():
    plain = report.render_html(PIECES, REL, title="t")
    assert "<script" not in plain and "<select" not in plain
    assert report.render_html(PIECES, REL, title="t", maps=None) == plain
    assert report.render_html(PIECES, REL, title="t", maps={}) == plain
    assert report.render_html(PIECES, REL, title="t", extra_html="") == plain


def test_map_of_the_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="per-token map 'short' has 2 values but there are 12 token pieces"):
        report.render_html(PIECES, REL, maps={"short": [1.0, 2.0]})


def test_extra_html_goes_after_the_facts_table_unescaped():
    page = report.render_html(PIECES, REL, meta={"model": "m"}, extra_html='<ol id="ranked"><li>p 1</li></ol>')
    assert '<td>m</td></tr></table><ol id="ranked"><li>p 1</li></ol>' in page


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_map_script_recolours_the_spans():
    """Run the page's script under node against a tiny stand-in for the DOM."""
    page = report.render_html(PIECES, REL, maps=MAPS)
    data_block = re.search(r'id="relevance-maps">(.*?)</script>', page, re.S).group(1)
    code = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    spans = re.findall(r'<span style="(background:[^"]*)" title="([^"]*)">', page.split('<div class="doc">')[1])
    assert len(spans) == len(PIECES)
    harness = """
    function Span(style, title) {
      var attrs = {style: style, title: title};
      this.getAttribute = function (k) { return attrs[k]; };
      this.setAttribute = function (k, v) { attrs[k] = v; };
      this.style = {};
      Object.defineProperty(this.style, "background", {set: function (v) { attrs.style = "background:" + v; }});
    }
    var spans = SPANS.map(function (s) { return new Span(s[0], s[1]); });
    var listeners = {};
    var select = {value: "0", addEventListener: function (k, f) { listeners[k] = f; }};
    var note = {textContent: ""};
    var byId = {"relevance-maps": {textContent: DATA}, "relevance-map": select, "relevance-map-scale": note};
    var document = {getElementById: function (k) { return byId[k]; },
                    querySelectorAll: function (q) { return q === ".doc > span" ? spans : []; }};
    CODE
    var out = [];
    ["2", "1", "0"].forEach(function (v) {
      select.value = v; listeners.change();
      out.push({note: note.textContent, spans: spans.map(function (s) {
        return [s.getAttribute("style"), s.getAttribute("title")]; })});
    });
    console.log(JSON.stringify(out));
    """.replace("SPANS", json.dumps(spans)).replace("DATA", json.dumps(data_block)).replace("CODE", code)
    result = subprocess.run(["node", "-e", harness], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    head, layer, back = json.loads(result.stdout)
    # "head ...": all -0.5, scale 0.5 -> full blue everywhere
    assert head["spans"] == [["background:rgba(31, 119, 180, 1.000)", "-0.5"]] * len(PIECES)
    assert head["note"] == "(max |value| = 0.5)"
    # "layer 3": 0 .. 11, scale 11, same formula as report.colour
    assert [s[0] for s in layer["spans"]] == ["background:" + report.colour(i, 11) for i in range(len(PIECES))]
    assert [s[1] for s in layer["spans"]] == [str(i) for i in range(len(PIECES))]
    # back to "all": exactly what the server rendered
    assert back["spans"] == [list(s) for s in spans] and back["note"] == ""


def test_write_reports_with_plot_and_maps(tmp_path):
    paths = report.write_reports(tmp_path, PIECES, REL, title="t", maps=MAPS, plot=True, model="tiny")
    assert len(paths) == 3
    json_path, html_path, png_path = paths
    assert png_path == tmp_path / "relevance.png" and png_path.read_bytes()[:8] == PNG_SIGNATURE
    data = json.loads(json_path.read_text())
    assert data["per_token_maps"] == MAPS and data["model"] == "tiny" and data["relevance"] == REL
    assert "maps" not in data and "plot" not in data  # the new keywords are not taken as meta
    page = html_path.read_text()
    assert _embedded_maps(page)["maps"] == MAPS and "<th>maps</th>" not in page


def test_write_reports_defaults_stay_two_paths_without_maps(tmp_path):
    paths = report.write_reports(tmp_path, PIECES, REL, model="tiny")
    assert len(paths) == 2 and not (tmp_path / "relevance.png").exists()
    assert "per_token_maps" not in json.loads(paths[0].read_text())
    assert "<script" not in paths[1].read_text()


def test_write_reports_plot_marks_paragraphs_and_labels_top_sentences(tmp_path, monkeypatch):
    seen = {}

    def fake_plot(path, relevance, **kw):
        seen.update(kw, relevance=list(relevance))
        path.write_bytes(PNG_SIGNATURE)
        return path

    monkeypatch.setattr(report, "plot_relevance", fake_plot)
    report.write_reports(tmp_path, PIECES, REL, title="doc", plot=True)
    assert seen["boundaries"] == [0, 9] and seen["title"] == "doc" and seen["relevance"] == REL
    # the top sentences with a positive share ("Dogs bark." has negative relevance: not a top sentence)
    assert seen["labels"] == [(0, "The cat sat."), (4, "It was <b>happy</b>!")]
