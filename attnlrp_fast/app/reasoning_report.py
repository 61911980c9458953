"""The parts of `attnlrp-fast explain`'s reports that show a reasoning model's multi-hop explanation
(longdoc.explain_answer with a ReasoningSpan; attnlrp_fast/reasoning.py for the definitions):

  the reasoning as its own heatmap   hop 0: how much each reasoning token contributed to the answer directly
  one document map per hop           hop 0 (the answer directly) .. hop K, beside the total (the page's main map)
  a table per hop                    its relevance on the document, the share left in the reasoning
  JSON "reasoning"                   the span, the reasoning tokens, hop 0 on them, per-hop document maps, shares
"""

import html

from attnlrp_fast.app import longdoc, report


def hop_label(h):
    return "hop 0 (the answer directly)" if h == 0 else f"hop {h} (through the reasoning)"


def document_maps(hops, doc):
    """{hop label: that hop's relevance on the document tokens}."""
    return {hop_label(h): r[doc] for h, r in enumerate(hops.relevance)}


def per_hop_rows(hops, doc):
    """(hop, relevance on the document, share left in the reasoning) per hop."""
    return [(h, sum(r[doc]), share) for h, (r, share) in enumerate(zip(hops.relevance, hops.share))]


def reasoning_tokens(tokenizer, ids, hops):
    """The reasoning tokens' text and their hop-0 relevance (what each gave the answer directly); a character split
    over several tokens is one entry, their relevance summed (longdoc.character_groups)."""
    span = ids[hops.span.start:hops.span.end]
    groups = longdoc.character_groups(tokenizer, span)
    texts = [tokenizer.decode(span[a:b]) for a, b in groups]
    return texts, report.sum_groups(groups, hops.relevance[0][hops.span.start:hops.span.end])


def html_section(tokens, values, hops, doc):
    """The page's reasoning section: the reasoning heatmap and the per-hop table (safe HTML)."""
    rows = "".join(f"<tr><td>{html.escape(hop_label(h))}</td><td>{on_doc:.4g}</td><td>{share:.1%}</td></tr>"
                   for h, on_doc, share in per_hop_rows(hops, doc))
    return (f"<h2>Reasoning ({len(tokens)} token{'s' if len(tokens) != 1 else ''}, "
            f"{html.escape(hops.span.source)})</h2>"
            f"<p class=\"note\">each reasoning token's relevance for the answer (hop 0); {hops.hops} hop(s) pass it "
            f"on to the prompt ({html.escape(hops.seed)} part of each token's relevance). The document below shows "
            "all hops together; the selector shows each hop.</p>"
            f"<div class=\"doc\">{report.inline_heatmap(tokens, values)}</div>"
            "<table><tr><th>hop</th><th>relevance on the document</th><th>share left in the reasoning</th></tr>"
            f"{rows}</table>")


def json_fields(tokens, values, hops, doc, groups=None):
    """The JSON report's "reasoning" entry; `groups`: the document tokens' character groups, as in the report's
    "tokens" (longdoc.character_groups)."""
    return {"reasoning": {
        "source": hops.span.source, "span": [hops.span.start, hops.span.end], "answer_start": hops.span.answer_start,
        "hops": hops.hops, "seed": hops.seed, "tokens": tokens, "relevance_hop0": list(values),
        "share_left_in_reasoning": list(hops.share),
        "relevance_document_per_hop": [on_doc for _, on_doc, _ in per_hop_rows(hops, doc)],
        "document_relevance_per_hop": [report.sum_groups(groups, r[doc]) if groups else r[doc]
                                       for r in hops.relevance],
    }}


def summary_lines(hops, doc):
    lines = [f"reasoning: positions {hops.span.start}..{hops.span.end - 1} ({hops.span.source}), {hops.hops} hop(s), "
             f"{hops.seed} relevance passed on"]
    for h, on_doc, share in per_hop_rows(hops, doc):
        lines.append(f"  {hop_label(h)}: {on_doc:.4g} on the document, {share:.1%} left in the reasoning")
    return lines
