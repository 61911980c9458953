"""Reports of a token relevance map: aggregation per sentence and paragraph, a self-contained HTML heatmap,
JSON, and a terminal summary.

Tokens are given as their text pieces (with the whitespace they carry), so that joining them gives the
document back; relevance is one float per token.
"""

import html
import json
import math
from dataclasses import dataclass

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
    """Token index ranges of sentences (end after . ! ? or a line break) or paragraphs (end at a blank line)."""
    spans, start = [], 0
    for i, piece in enumerate(pieces):
        if kind == "paragraph":
            ends = "\n\n" in piece or (piece.endswith("\n") and i + 1 < len(pieces) and pieces[i + 1].startswith("\n"))
        else:
            ends = piece.rstrip().endswith(_SENTENCE_END) or "\n" in piece
        if ends:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(pieces):
        spans.append((start, len(pieces)))
    return [(s, e) for s, e in spans if "".join(pieces[s:e]).strip()]


def segments(pieces, relevance, kind="sentence"):
    """Sentences or paragraphs with their summed relevance, in document order."""
    if len(pieces) != len(relevance):
        raise ValueError(f"{len(pieces)} token pieces but {len(relevance)} relevance values")
    if kind not in ("sentence", "paragraph"):
        raise ValueError(f"kind must be 'sentence' or 'paragraph', got {kind!r}")
    return [Segment(kind, s, e, "".join(pieces[s:e]).strip(), float(sum(relevance[s:e])))
            for s, e in _spans(pieces, kind)]


def top_segments(segs, k=5):
    """The k segments with the largest relevance, with their share of the total positive relevance."""
    positive = sum(max(s.relevance, 0.0) for s in segs) or 1.0
    ranked = sorted(segs, key=lambda s: s.relevance, reverse=True)[:k]
    return [(s, s.relevance / positive) for s in ranked]


def _colour(value, scale):
    """Diverging scale: red for positive, blue for negative relevance, white at zero."""
    a = 0.0 if scale == 0 else max(-1.0, min(1.0, value / scale))
    if a >= 0:
        return f"rgba(214, 39, 40, {a:.3f})"
    return f"rgba(31, 119, 180, {-a:.3f})"


def render_html(pieces, relevance, *, title="Relevance", meta=None, top=None):
    """A self-contained HTML page: the document as a heatmap (value on hover) and the top passages.
    Every piece of text is escaped."""
    finite = [abs(r) for r in relevance if math.isfinite(r)]
    scale = max(finite) if finite else 0.0
    spans = []
    for piece, r in zip(pieces, relevance):
        text = html.escape(piece).replace("\n", "<br>\n")
        spans.append(f'<span style="background:{_colour(r, scale)}" title="{r:.4g}">{text}</span>')
    rows = "".join(
        f"<li><b>{share:.1%}</b> ({seg.relevance:.4g}): {html.escape(seg.text)}</li>" for seg, share in (top or []))
    facts = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in (meta or {}).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; line-height: 1.6; }}
.doc {{ white-space: normal; border: 1px solid #ddd; padding: 1rem; }}
.doc span {{ border-radius: 2px; }}
table {{ border-collapse: collapse; }} th {{ text-align: left; padding-right: 1rem; }}
.legend span {{ padding: 0 .5rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{facts}</table>
<p class="legend">scale: <span style="background:{_colour(-1, 1)}">negative</span>
<span>0</span><span style="background:{_colour(1, 1)}">positive</span> (max |relevance| = {scale:.4g})</p>
<h2>Most relevant passages</h2><ol>{rows}</ol>
<h2>Document</h2><div class="doc">{''.join(spans)}</div>
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


def write_reports(out_dir, pieces, relevance, *, title="Relevance", **meta):
    """explanation.json and explanation.html in out_dir; returns their paths."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report_dict(pieces, relevance, **meta)
    top = top_segments(segments(pieces, relevance, "sentence"))
    (out / "explanation.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    (out / "explanation.html").write_text(render_html(pieces, relevance, title=title, meta=meta, top=top),
                                          encoding="utf-8")
    return out / "explanation.json", out / "explanation.html"


def summary(pieces, relevance, k=5, width=100):
    """Terminal lines: the top sentences and paragraphs with their share of the positive relevance."""
    lines = []
    for kind in ("sentence", "paragraph"):
        lines.append(f"top {kind}s:")
        for seg, share in top_segments(segments(pieces, relevance, kind), k):
            text = " ".join(seg.text.split())
            text = text if len(text) <= width else text[: width - 3] + "..."
            lines.append(f"  {share:6.1%}  {text}")
    return lines
