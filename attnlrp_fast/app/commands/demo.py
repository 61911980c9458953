"""`attnlrp-fast demo`: the whole job offline on the embedded MiniLM (app/demo.py computes it): which words make
the best passages of a document match a query; explanation.json, .html and .png, and a summary."""

import html
import time

from attnlrp_fast.app import demo, longdoc, report
from attnlrp_fast.app.common import UsageError, bar_factory, choose_device, extend_json, print_summary
from attnlrp_fast.bindings import dispatch


def _demo_html(r):
    """The page's extra sections: the passages ranked by similarity, and the query tokens as a heatmap."""
    explained = {e.index for e in r.explained}
    items = []
    for i in r.ranked[:10]:
        p = r.passages[i]
        mark = " (explained)" if i in explained else ""
        items.append(f"<li>{p.score:.3f}{mark}: {html.escape(p.text[:160])}{'...' if len(p.text) > 160 else ''}</li>")
    return (f"<h2>Passages ranked by similarity to the query</h2><ol>{''.join(items)}</ol>"
            f"<h2>Query tokens that match the best passage</h2>"
            f"<p>{report.inline_heatmap(r.query_match.tokens, r.query_match.relevance)}</p>")


def _demo_passages(r):
    """The JSON report's passages, best first; the explained ones with their wordpieces' relevance."""
    explained = {e.index: e.match for e in r.explained}
    rows = []
    for rank, i in enumerate(r.ranked, 1):
        p = r.passages[i]
        row = {"rank": rank, "score": p.score, "start_char": p.start, "end_char": p.end, "text": p.text,
               "explained": i in explained}
        if i in explained:
            match = explained[i]
            row.update(similarity_explained=match.similarity, wordpieces=match.tokens,
                       wordpiece_relevance=match.relevance)
        rows.append(row)
    return rows


def _demo_lines(r, query, device, top):
    lines = [f"query: {query!r}; {len(r.passages)} passages ranked with {r.model} on {device}",
             "best passages (cosine similarity):"]
    for i in r.ranked[:top]:
        p = r.passages[i]
        lines.append(f"  {p.score:.3f}  {' '.join(p.text.split())[:90]}...")
    q_top = sorted(zip(r.query_match.tokens, r.query_match.relevance), key=lambda x: -x[1])[:4]
    lines.append("query tokens that match the best passage most: " + ", ".join(f"{t} ({v:.3f})" for t, v in q_top))
    return lines


def run(args):
    t0 = time.perf_counter()
    device = choose_device(args.device)
    path = args.document or demo.sample_document_path()
    document = longdoc.read_document(path)
    query = args.query if args.query is not None else demo.DEFAULT_QUERY
    if not query.strip():
        raise UsageError("--query is empty")
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    r = demo.run(document, query, top=args.top, device=device, rule=args.rule,
                 backend=dispatch.backend_for_many_passes(device), bar=bar_factory(args.quiet))
    paths = report.write_reports(
        args.out, r.pieces, r.relevance, title=f"Which words make these passages match: {query}",
        extra_html=_demo_html(r), plot=True, model=r.model, query=query, rule=args.rule, device=str(device),
        document=str(path), passages_explained=len(r.explained))
    r.timings["total"] = time.perf_counter() - t0
    extend_json(paths[0], {"passages": _demo_passages(r), "query_tokens": r.query_match.tokens,
                           "query_relevance": r.query_match.relevance, "timings": r.timings})
    print_summary(r.pieces, r.relevance, paths, _demo_lines(r, query, device, args.top))
    return 0
