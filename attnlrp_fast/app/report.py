"""Reports of a token relevance map: aggregation per sentence and paragraph, a self-contained HTML heatmap
(optionally with a selector between several per-token maps), JSON, a PNG plot along the document, and a
terminal summary.

Tokens are given as their text pieces (with the whitespace they carry), so that joining them gives the
document back; relevance is one float per token. A character that a byte-level tokenizer split over several tokens
is shown as one token (join_groups / sum_groups over longdoc.character_groups, before the reports are written): its
pieces joined, its relevance summed, in the page, the top passages and the JSON's "tokens" and "relevance" (and
every other per-token list beside them), which stay parallel.
"""

import html
import json
import math
from dataclasses import dataclass

import numpy as np

_SENTENCE_END = (".", "!", "?", "\u3002")


@dataclass
class Segment:
    kind: str          # "sentence" | "paragraph"
    start: int         # first token index
    end: int           # one past the last token index
    text: str
    relevance: float

    def as_dict(self):
        return {"kind": self.kind, "start": self.start, "end": self.end, "text": self.text, "relevance": self.relevance}


def _spans(pieces, kind):
    """Token index ranges of sentences (end at . ! ? followed by whitespace, or at a paragraph end) or paragraphs
    (end at a blank line). A single line break inside a paragraph (wrapped text) does not end a sentence."""
    spans, start, n = [], 0, len(pieces)
    for i, piece in enumerate(pieces):
        nxt = pieces[i + 1] if i + 1 < n else ""
        paragraph_end = "\n\n" in piece or (piece.endswith("\n") and nxt.startswith("\n"))
        if kind == "paragraph":
            ends = paragraph_end
        else:
            core = piece.rstrip().rstrip("\"')]\u201d\u2019")
            ends = paragraph_end or (core.endswith(_SENTENCE_END) and (
                piece != piece.rstrip() or not nxt or nxt[:1].isspace()))
        if ends:
            spans.append((start, i + 1))
            start = i + 1
    if start < n:
        spans.append((start, n))
    return [(s, e) for s, e in spans if "".join(pieces[s:e]).strip()]


def segments(pieces, relevance, kind="sentence"):
    """Sentences or paragraphs with their summed relevance, in document order."""
    if len(pieces) != len(relevance):
        raise ValueError(f"{len(pieces)} token pieces but {len(relevance)} relevance values")
    if kind not in ("sentence", "paragraph"):
        raise ValueError(f"kind must be 'sentence' or 'paragraph', got {kind!r}")
    return [Segment(kind, s, e, "".join(pieces[s:e]).strip(), float(sum(relevance[s:e])))
            for s, e in _spans(pieces, kind)]


def join_groups(groups, pieces):
    """The pieces of each [start, end) group joined: one per group."""
    return [pieces[s] if e - s == 1 else "".join(pieces[s:e]) for s, e in groups]


def sum_groups(groups, values):
    """The values of each [start, end) group summed: one per group."""
    return [values[s] if e - s == 1 else sum(values[s:e]) for s, e in groups]


SHARE_OF = "share of the document's positive relevance"   # what top_segments' shares are, in the reports
_MIN_SHARE = 0.0005   # smaller shares print as 0.0 %: such segments are not listed as "top"


def top_segments(segs, k=5):
    """The k segments with the largest relevance, with their share of the total positive relevance (the sum of
    the segments' relevance where it is positive); segments whose share would print as 0.0 % are left out."""
    positive = sum(max(s.relevance, 0.0) for s in segs) or 1.0
    ranked = sorted(segs, key=lambda s: s.relevance, reverse=True)
    return [(s, s.relevance / positive) for s in ranked if s.relevance / positive >= _MIN_SHARE][:k]


_RED = (214, 39, 40)      # positive relevance, in the HTML heatmap and the plot
_BLUE = (31, 119, 180)    # negative relevance


def colour(value, scale):
    """The CSS background of a relevance value: red for positive, blue for negative, white at zero; full colour
    at |value| >= scale (the heatmap's scale is the largest |value| shown)."""
    a = 0.0 if scale == 0 else max(-1.0, min(1.0, value / scale))
    if a >= 0:
        return "rgba({}, {}, {}, {:.3f})".format(*_RED, a)
    return "rgba({}, {}, {}, {:.3f})".format(*_BLUE, -a)


def inline_heatmap(tokens, values):
    """A short token list (a query, say) as an HTML fragment: each token escaped, coloured by its value on the
    scale of the largest |value| and followed by a space, the value on hover."""
    scale = max(map(abs, values), default=0) or 1
    return "".join(f'<span title="{v:.4g}" style="background:{colour(v, scale)}">{html.escape(t)}</span> '
                   for t, v in zip(tokens, values))


def _json_values(values):
    """Floats for JSON embedded in the page; non-finite values become null (JSON has no NaN)."""
    out = []
    for v in values:
        v = float(v)
        out.append(v if math.isfinite(v) else None)
    return out


def _script_json(obj):
    """JSON that is safe inside a <script> element: no '<', '>' or '&' (so no '</script>' or '<!--'), and no
    U+2028/U+2029 line separators."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


# Recolours the heatmap spans when another per-token map is selected; "all" (option 0) restores the colours
# and hover values rendered on the server. Same diverging formula as colour(), scale = max |value| of the map.
_MAP_SCRIPT = """<script>
(function () {
  var data = JSON.parse(document.getElementById("relevance-maps").textContent);
  var select = document.getElementById("relevance-map");
  var note = document.getElementById("relevance-map-scale");
  var spans = document.querySelectorAll(".doc > span");
  var original = [];
  for (var i = 0; i < spans.length; i++) {
    original.push([spans[i].getAttribute("style"), spans[i].getAttribute("title")]);
  }
  function colour(v, scale) {
    var a = scale === 0 ? 0 : Math.max(-1, Math.min(1, v / scale));
    if (a >= 0) { return "rgba(%d, %d, %d, " + a.toFixed(3) + ")"; }
    return "rgba(%d, %d, %d, " + (-a).toFixed(3) + ")";
  }
  function fmt(v) { return v === null ? "nan" : String(Number(v.toPrecision(4))); }
  function show() {
    var k = Number(select.value);
    var i;
    if (k === 0) {
      for (i = 0; i < spans.length; i++) {
        spans[i].setAttribute("style", original[i][0]);
        spans[i].setAttribute("title", original[i][1]);
      }
      note.textContent = "";
      return;
    }
    var values = data.maps[data.labels[k - 1]];
    var scale = 0;
    for (i = 0; i < values.length; i++) {
      if (values[i] !== null && Math.abs(values[i]) > scale) { scale = Math.abs(values[i]); }
    }
    for (i = 0; i < spans.length && i < values.length; i++) {
      spans[i].style.background = colour(values[i] === null ? 0 : values[i], scale);
      spans[i].setAttribute("title", fmt(values[i]));
    }
    note.textContent = "(max |value| = " + fmt(scale) + ")";
  }
  select.addEventListener("change", show);
})();
</script>""" % (_RED + _BLUE)


def _check_maps(pieces, maps):
    """{label (as str): list of floats}, in the given order; every map has one value per token piece."""
    checked = {}
    for label, values in (maps or {}).items():
        values = [float(v) for v in values]
        if len(values) != len(pieces):
            raise ValueError(f"per-token map {label!r} has {len(values)} values but there are "
                             f"{len(pieces)} token pieces")
        checked[str(label)] = values
    return checked


def _map_selector(relevance, maps, label="per-token map"):
    """The <select> between "all" and each map (placed before the document), and the maps as a JSON data block
    with the script (placed after it, so that the spans exist when the script runs)."""
    options = '<option value="0">all</option>' + "".join(
        f'<option value="{i}">{html.escape(label)}</option>' for i, label in enumerate(maps, 1))
    data = {"all": _json_values(relevance), "labels": list(maps),
            "maps": {label: _json_values(values) for label, values in maps.items()}}
    selector = (f'<p class="maps"><label for="relevance-map">{html.escape(label)}:</label> '
                f'<select id="relevance-map">{options}</select> <span id="relevance-map-scale"></span></p>\n')
    script = (f'\n<script type="application/json" id="relevance-maps">{_script_json(data)}</script>\n'
              f'{_MAP_SCRIPT}')
    return selector, script


_LABELS = {   # the facts table's row labels for the keys the commands pass; other keys: underscores to spaces
    "dtype": "Data type", "answer_source": "Answer source", "target_logit": "Target logit (the explained score)",
    "prompt_tokens": "Prompt tokens", "document_tokens": "Document tokens", "relevance_total": "Relevance in total",
    "relevance_document": "Relevance on the document",
    "relevance_question_and_template": "Relevance on the question and chat template",
    "relevance_earlier_answer_tokens": "Relevance on earlier answer tokens",
    "passages_explained": "Passages explained",
}


def fact_label(key):
    """A row label for people: 'relevance_total' -> 'Relevance in total', 'some_key' -> 'Some key'."""
    key = str(key)
    if key in _LABELS:
        return _LABELS[key]
    text = key.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def fact_value(value):
    """A table cell for people: floats to 4 significant digits, integers with thousands separators, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _top_list(top):
    return "".join(f"<li><b>{share:.1%}</b> ({seg.relevance:.4g}): {html.escape(seg.text)}</li>"
                   for seg, share in (top or []))


def render_html(pieces, relevance, *, title="Relevance", meta=None, top=None, maps=None, extra_html="",
                top_paragraphs=None, maps_label="per-token map", warnings=()):
    """A self-contained HTML page: `warnings` under the title, the document as a heatmap (value on hover), the top
    sentences (`top`) and paragraphs (`top_paragraphs`; both lists of top_segments), and `meta` as a table for people
    (labels, rounded numbers). Every piece of text is escaped.

    maps: optional {label: per-token values (one per piece)}; when non-empty the page gets a selector between
    "all" (`relevance`) and each map, and a small inline script that recolours the document (no script
    otherwise). extra_html: an already-safe HTML fragment placed after the facts table (not escaped here)."""
    maps = _check_maps(pieces, maps)
    finite = [abs(r) for r in relevance if math.isfinite(r)]
    scale = max(finite) if finite else 0.0
    spans = []
    for piece, r in zip(pieces, relevance):
        text = html.escape(piece).replace("\n", "<br>\n")
        spans.append(f'<span style="background:{colour(r, scale)}" title="{r:.4g}">{text}</span>')
    rows, paragraph_rows = _top_list(top), _top_list(top_paragraphs)
    facts = "".join(f"<tr><th>{html.escape(fact_label(k))}</th><td>{html.escape(fact_value(v))}</td></tr>"
                    for k, v in (meta or {}).items())
    paragraphs = (f"<h2>Most relevant paragraphs</h2><p class=\"note\">{SHARE_OF} (relevance in brackets)</p>"
                  f"<ol>{paragraph_rows}</ol>\n" if top_paragraphs is not None else "")
    selector, script = _map_selector(relevance, maps, maps_label) if maps else ("", "")
    notes = "".join(f'<p class="warning">Warning: {html.escape(w)}</p>\n' for w in warnings)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; line-height: 1.6; }}
.doc {{ white-space: normal; border: 1px solid #ddd; padding: 1rem; }}
.doc span {{ border-radius: 2px; }}
table {{ border-collapse: collapse; }} th {{ text-align: left; padding-right: 1rem; }}
.legend span {{ padding: 0 .5rem; }}
.note {{ color: #555; font-size: 90%; margin: 0; }}
.warning {{ background: #fff3cd; border: 1px solid #e0c36c; padding: .5rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{notes}<table>{facts}</table>{extra_html}
<p class="legend">scale: <span style="background:{colour(-1, 1)}">negative</span>
<span>0</span><span style="background:{colour(1, 1)}">positive</span> (max |relevance| = {scale:.4g})</p>
<h2>Most relevant sentences</h2><p class="note">{SHARE_OF} (relevance in brackets)</p><ol>{rows}</ol>
{paragraphs}<h2>Document</h2>{selector}<div class="doc">{''.join(spans)}</div>{script}
</body></html>
"""


def report_dict(pieces, relevance, **meta):
    """The JSON report: tokens, relevance per token, per sentence and per paragraph, and `meta`."""
    return {
        **meta,
        "tokens": list(pieces),
        "relevance": [float(r) for r in relevance],
        "sentences": [s.as_dict() for s in segments(pieces, relevance, "sentence")],
        "paragraphs": [s.as_dict() for s in segments(pieces, relevance, "paragraph")],
    }


def write_reports(out_dir, pieces, relevance, *, title="Relevance", maps=None, plot=False, extra_html="",
                  maps_label="per-token map", warnings=(), **meta):
    """explanation.json and explanation.html in out_dir; returns their paths.

    maps: optional {label: per-token values}, shown by a selector in the page and stored in the JSON as
    "per_token_maps". extra_html: see render_html. warnings: sentences that head the page and are the JSON's
    "warnings" list (empty when none). plot=True also writes relevance.png (paragraph starts marked, the top 3
    sentences labelled) and returns (json, html, png)."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checked = _check_maps(pieces, maps)
    data = report_dict(pieces, relevance, **meta, warnings=list(warnings))
    if checked:
        data["per_token_maps"] = checked
    sentences = segments(pieces, relevance, "sentence")
    paragraphs = segments(pieces, relevance, "paragraph")
    (out / "explanation.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    (out / "explanation.html").write_text(
        render_html(pieces, relevance, title=title, meta=meta, top=top_segments(sentences), maps=checked,
                    extra_html=extra_html, top_paragraphs=top_segments(paragraphs), maps_label=maps_label,
                    warnings=warnings),
        encoding="utf-8")
    if not plot:
        return out / "explanation.json", out / "explanation.html"
    starts = [seg.start for seg in paragraphs]
    labels = [(seg.start, seg.text) for seg, _ in top_segments(sentences, 3)]
    png = plot_relevance(out / "relevance.png", relevance, boundaries=starts, title=title, labels=labels)
    return out / "explanation.json", out / "explanation.html", png


def _plain_label(text, limit=30):
    """One line of at most `limit` characters, with matplotlib's mathtext '$' made literal."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("$", r"\$")


def plot_relevance(path, relevance, *, boundaries=(), title="Relevance along the document", labels=None):
    """A PNG of the relevance along the token positions; returns its Path.

    Per-token relevance is drawn as thin bars (red positive, blue negative, as in the HTML page); beyond
    about 2000 tokens the bars show the largest positive and the most negative value of each group of
    neighbouring tokens, so that no peak disappears. A dark line on the right-hand axis is the moving sum
    over max(1, N // 200) tokens. `boundaries` are token indices where passages start (light vertical
    lines), `labels` a list of (token index, text) to annotate, text cut to 30 characters. Non-finite values
    are left out (and counted in the title)."""
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(relevance, dtype=float).reshape(-1)
    if values.size == 0:
        raise ValueError("relevance is empty: there is nothing to plot")
    finite = np.isfinite(values)
    clean = np.where(finite, values, 0.0)

    fig = Figure(figsize=(12, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    _draw_bars(ax, clean, boundaries)
    ax2 = _draw_moving_sum(ax, _moving_sum(clean))
    _draw_labels(ax, labels or [], clean.size)
    ax.set_title(_heading(title, missing=int(clean.size - finite.sum())))
    handles = ax.get_legend_handles_labels()
    extra = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="lower right", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


@dataclass
class _Columns:
    """The plot's bars: their x positions and the heights above and below zero."""
    x: np.ndarray
    upper: np.ndarray
    lower: np.ndarray


def _columns(clean, limit=2000):
    """One bar per token, or, beyond `limit` tokens, one per group of neighbouring tokens spanning the group's
    largest positive and most negative value."""
    n = clean.size
    if n <= limit:
        return _Columns(np.arange(n, dtype=float), np.maximum(clean, 0.0), np.minimum(clean, 0.0))
    group = -(-n // limit)
    padded = np.zeros(group * (-(-n // group)))
    padded[:n] = clean
    blocks = padded.reshape(-1, group)
    return _Columns(np.arange(len(blocks)) * group + (group - 1) / 2.0,
                    np.maximum(blocks.max(axis=1), 0.0), np.minimum(blocks.min(axis=1), 0.0))


def _draw_bars(ax, clean, boundaries):
    """Passage starts (light lines), the relevance bars and the zero line on the left-hand axis."""
    n = clean.size
    columns = _columns(clean)
    width = max(0.4, min(8.0, 700.0 / len(columns.x)))  # points; the axes are about 900 points wide
    red, blue = tuple(c / 255 for c in _RED), tuple(c / 255 for c in _BLUE)
    starts = [b - 0.5 for b in boundaries if 0 <= b < n]
    if starts:
        ax.vlines(starts, 0, 1, transform=ax.get_xaxis_transform(), colors="0.85", linewidth=0.8, zorder=0)
    ax.vlines(columns.x, 0, columns.upper, colors=[red], linewidth=width, label="relevance > 0")
    ax.vlines(columns.x, columns.lower, 0, colors=[blue], linewidth=width, label="relevance < 0")
    ax.axhline(0, color="0.5", linewidth=0.6)
    peak = float(np.abs(clean).max())
    limit = peak * 1.08 if peak > 0 else 1.0
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(-limit, limit)
    ax.set_xlabel("token position")
    ax.set_ylabel("relevance")


@dataclass
class _MovingSum:
    window: int           # tokens per sum
    values: np.ndarray    # one centred sum per token position


def _moving_sum(clean):
    """The centred moving sum over max(1, N // 200) tokens, by cumulative sums (linear in N)."""
    n = clean.size
    window = max(1, n // 200)
    total = np.concatenate(([0.0], np.cumsum(clean)))
    left = np.clip(np.arange(n) - window // 2, 0, n)
    return _MovingSum(window, total[np.clip(left + window, 0, n)] - total[left])


def _draw_moving_sum(ax, moving):
    """The moving sum as a dark line on a right-hand axis of its own; returns that axis."""
    ax2 = ax.twinx()
    ax2.plot(np.arange(moving.values.size), moving.values, color="0.15", linewidth=1.0,
             label=f"moving sum over {moving.window} token{'s' if moving.window > 1 else ''}")
    reach = float(np.abs(moving.values).max()) * 1.08
    ax2.set_ylim(-(reach or 1.0), reach or 1.0)
    ax2.set_ylabel("moving sum")
    return ax2


def _draw_labels(ax, labels, n):
    """Numbered, dashed markers with their text for the (token index, text) labels inside 0..n-1, staggered in
    four heights; text runs left of markers in the last quarter."""
    for k, (index, text) in enumerate(labels):
        if not 0 <= index < n:
            continue
        height = 0.97 - 0.09 * (k % 4)
        ax.vlines([index], 0, height, transform=ax.get_xaxis_transform(), colors="0.3", linewidth=0.6,
                  linestyles="dashed")
        right = index >= 0.75 * n
        ax.annotate(f"{k + 1}. {_plain_label(text)}", xy=(index, height), xycoords=ax.get_xaxis_transform(),
                    xytext=(-3 if right else 3, 0), textcoords="offset points", fontsize=8, va="top",
                    ha="right" if right else "left",
                    bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="0.7", alpha=0.85))


def _heading(title, missing):
    """The plot's title on one line, with the count of non-finite values left out."""
    heading = _plain_label(title, limit=120)
    if missing:
        heading += f"  ({missing} non-finite value{'s' if missing > 1 else ''} left out)"
    return heading


def summary(pieces, relevance, k=5, width=100):
    """Terminal lines: the top sentences and paragraphs with their share of the document's positive relevance
    (none listed whose share prints as 0.0 %)."""
    lines = []
    for kind in ("sentence", "paragraph"):
        lines.append(f"top {kind}s ({SHARE_OF}):")
        top = top_segments(segments(pieces, relevance, kind), k)
        if not top:
            lines.append("  (none: no positive relevance in the document)")
        for seg, share in top:
            text = " ".join(seg.text.split())
            text = text if len(text) <= width else text[: width - 3] + "..."
            lines.append(f"  {share:6.1%}  {text}")
    return lines
