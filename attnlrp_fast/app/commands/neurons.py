"""`attnlrp-fast neurons`: which hidden neurons made a causal LM give its answer. The most relevant MLP neurons for
the answer's first token (AttnLRP relevance at each layer's MLP neurons, summed over the prompt's positions), each
with its vocabulary (what it writes onto the unembedding) and, with --corpus, the corpus windows where it fires most,
each explained; with --set, the answer before and after switching neurons. Writes neurons.json and neurons.html.

--set takes NEURON=VALUE: NEURON is LATENT[INDEX] (e.g. model.layers.3.mlp.down_proj:input[17]), or INDEX with one
--latent, or #RANK for the RANK-th neuron of the list; VALUE is a number (set the neuron to it), *F (scale it by F)
or +V (add V)."""

import html
import json
import re
import time
from pathlib import Path

from attnlrp_fast.app import longdoc, report
from attnlrp_fast.app.common import (UsageError, bar_factory, choose_backend, choose_device, choose_dtype,
                                     layer_progress, load_model)
from attnlrp_fast.memory import transformer_layers

CONCEPT = "concept"   # --model concept: the shipped tiny Llama with a planted concept neuron (evaluation/concept.py)
_SET = re.compile(r"^(?P<neuron>.+?)=(?P<value>[*+]?[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)$")


def _model(args, device, dtype):
    if args.model == CONCEPT and not Path(args.model).exists():
        from attnlrp_fast.evaluation import concept

        args.model = str(concept.weights_path())
    return load_model(args, device, dtype)


def _prompt(args, tokenizer):
    text = args.prompt
    if text is None and args.prompt_file is not None:
        text = longdoc.read_document(args.prompt_file)
    if text is None or not text.strip():
        raise UsageError("--prompt is empty: give the text to answer (or --prompt-file FILE)")
    return longdoc.build_prompt(tokenizer, text, None, chat=not args.no_chat)


def _latents(args, model):
    from attnlrp_fast.neurons import mlp_latents

    if args.latent:
        for name in args.latent:
            module = name.partition(":")[0]
            try:
                model.get_submodule(module)
            except AttributeError:
                raise UsageError(f"--latent {name}: the model has no module named {module!r}") from None
        return list(args.latent)
    found = mlp_latents(model)
    if not found:
        raise UsageError(f"no MLP down projection found in {type(model).__name__}'s layers; name the neurons with "
                         "--latent MODULE[:input]")
    return found


def _parse_sets(args, ranked):
    """--set options -> {latent: {neuron: edit}}."""
    import attnlrp_fast as af

    edits = {}
    for item in args.set or ():
        m = _SET.match(item.replace(" ", ""))
        if not m:
            raise UsageError(f"--set {item}: expected NEURON=VALUE, VALUE a number, *FACTOR or +AMOUNT")
        neuron, value = m.group("neuron"), m.group("value")
        if neuron.startswith("#"):
            rank = int(neuron[1:]) if neuron[1:].isdigit() else 0
            if not 1 <= rank <= len(ranked):
                raise UsageError(f"--set {item}: #{neuron[1:]} is not a rank of the {len(ranked)} neurons listed")
            latent, index = ranked[rank - 1]["latent"], ranked[rank - 1]["neuron"]
        elif neuron.endswith("]") and "[" in neuron:
            latent, _, index = neuron[:-1].rpartition("[")
            if not index.isdigit():
                raise UsageError(f"--set {item}: the neuron index {index!r} is not a number")
            index = int(index)
        elif neuron.isdigit():
            if not args.latent or len(args.latent) != 1:
                raise UsageError(f"--set {item}: a bare index needs exactly one --latent; write LATENT[INDEX]")
            latent, index = args.latent[0], int(neuron)
        else:
            raise UsageError(f"--set {item}: the neuron is LATENT[INDEX], INDEX (with one --latent) or #RANK")
        edit = af.scale(float(value[1:])) if value[0] == "*" else af.add(float(value[1:])) if value[0] == "+" else \
            af.set_to(float(value))
        edits.setdefault(latent, {})[index] = edit
    return edits


def _check_edits(model, edits, widths):
    for latent, neurons in edits.items():
        module = latent.partition(":")[0]
        try:
            model.get_submodule(module)
        except AttributeError:
            raise UsageError(f"--set: the model has no module named {module!r}") from None
        width = widths.get(latent)
        for i in neurons:
            if width is not None and not 0 <= i < width:
                raise UsageError(f"--set: neuron {i} is outside {latent}'s {width} neurons")


def _rank(explanation, latents, top):
    """The `top` neurons over all latents by relevance summed over the batch row's positions."""
    import torch

    rows = []
    for name in latents:
        r = explanation.latent[name][0].sum(0)          # (F,)
        rows.append((name, r))
    flat = torch.cat([r for _, r in rows])
    k = min(top, flat.numel())
    order = flat.topk(k).indices.tolist()
    offsets, out = [], []
    start = 0
    for name, r in rows:
        offsets.append((start, name, r.numel()))
        start += r.numel()
    for flat_i in order:
        for s, name, n in offsets:
            if s <= flat_i < s + n:
                out.append({"latent": name, "neuron": flat_i - s, "relevance": float(flat[flat_i])})
                break
    return out, {name: r.numel() for name, r in rows}


def _activations(model, ids, latents):
    """Each latent's activation at the last position (1, F) in a plain forward."""
    import torch

    seen, hooks = {}, []
    for name in latents:
        module_name, _, where = name.partition(":")
        module = model.get_submodule(module_name)

        def keep(m, *a, name=name, where=where):
            v = a[0][0] if where == "input" else a[1]
            seen[name] = (v[0] if isinstance(v, (tuple, list)) else v)[0, -1].float().cpu()
        hooks.append(module.register_forward_pre_hook(keep) if where == "input" else module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _corpus(path):
    if not path:
        return None
    try:
        text = longdoc.read_document(path)
    except longdoc.InputError as e:
        raise UsageError(str(e).replace("--document", "--corpus", 1)) from None
    texts = [t.strip() for t in re.split(r"\n\s*\n", text) if t.strip()]
    if not texts:
        raise UsageError(f"--corpus {path}: the corpus holds no text")
    return texts


def _html(out, prompt_tokens, relevance, answer, ranked, before_after):
    cells = []
    for i, n in enumerate(ranked, 1):
        vocab = n["vocabulary"]
        top = ", ".join(html.escape(repr(t)) for t in vocab["top"]) if vocab else "(no down projection found)"
        bottom = ", ".join(html.escape(repr(t)) for t in vocab["bottom"]) if vocab else ""
        windows = "".join(
            f'<li><span class="act">{w["activation"]:.3g}</span> '
            f'{report.inline_heatmap(w["tokens"], w["relevance"])}</li>' for w in n.get("windows", []))
        cells.append(f"<tr><td>{i}</td><td><code>{html.escape(n['latent'])}[{n['neuron']}]</code></td>"
                     f"<td>{n['relevance']:.4g}</td><td>{n['activation']:.4g}</td><td>{top}</td><td>{bottom}</td></tr>"
                     + (f'<tr><td></td><td colspan="5"><ol class="windows">{windows}</ol></td></tr>' if windows
                        else ""))
    change = ""
    if before_after:
        change = (f"<h2>Intervention</h2><p>{html.escape(', '.join(before_after['set']))}</p>"
                  f"<p>before: <b>{html.escape(before_after['before'])}</b><br>"
                  f"after: <b>{html.escape(before_after['after'])}</b></p>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Neurons behind the answer</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; line-height: 1.6; }}
table {{ border-collapse: collapse; }} td, th {{ padding: .2rem .6rem; vertical-align: top; text-align: left; }}
.windows {{ margin: 0; font-size: 90%; }} .act {{ color: #555; }}
</style></head><body>
<h1>Neurons behind the answer {html.escape(repr(answer))}</h1>
<h2>Prompt (relevance of each token for the answer)</h2><p>{report.inline_heatmap(prompt_tokens, relevance)}</p>
<h2>Most relevant neurons</h2>
<p>relevance: AttnLRP relevance of the neuron for the answer's first token, summed over the prompt's positions;
activation: its value at the last position; vocabulary: the tokens one unit of it raises (top) and lowers (bottom)
through the final norm and the unembedding; windows (with --corpus): where it fires most, each token coloured by its
relevance for that activation.</p>
<table><tr><th>#</th><th>neuron</th><th>relevance</th><th>activation</th><th>raises</th><th>lowers</th></tr>
{''.join(cells)}</table>
{change}
</body></html>
"""
    (out / "neurons.html").write_text(page, encoding="utf-8")


def run(args):
    import torch

    import attnlrp_fast as af
    from attnlrp_fast.neurons import neuron_vocabulary, top_activating

    for flag, value in (("--top", args.top), ("--vocabulary", args.vocabulary), ("--windows", args.windows),
                        ("--window", args.window), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    for item in args.set or ():
        if not _SET.match(item.replace(" ", "")):
            raise UsageError(f"--set {item}: expected NEURON=VALUE, VALUE a number, *FACTOR or +AMOUNT")
    texts = _corpus(args.corpus)
    bar = bar_factory(args.quiet, lines=True)
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    backend = choose_backend(args.backend, device, dtype, many_passes=True)
    model, tokenizer = _model(args, device, dtype)
    prompt = _prompt(args, tokenizer)
    latents = _latents(args, model)
    answer_ids = (longdoc.tokenize_answer(tokenizer, args.answer) if args.answer is not None else
                  longdoc.generate_answer(model, tokenizer, prompt.ids, args.max_new_tokens, backend=backend))
    first = answer_ids[0]
    ids = torch.tensor([prompt.ids], device=device)
    t = time.perf_counter()
    progress = layer_progress(bar, len(transformer_layers(model)), "explaining the answer")
    try:
        e = af.explain(model, input_ids=ids, target=first, latent=latents, rule=args.rule, backend=backend,
                       progress=progress)
    except ValueError as err:
        raise UsageError(str(err)) from None
    progress.close()
    seconds = time.perf_counter() - t
    ranked, widths = _rank(e, latents, args.top)
    acts = _activations(model, ids, [n["latent"] for n in ranked])
    for n in ranked:
        n["activation"] = float(acts[n["latent"]][n["neuron"]])
        try:
            v = neuron_vocabulary(model, n["latent"], n["neuron"], k=args.vocabulary, tokenizer=tokenizer)
            n["vocabulary"] = {"top": v.top_tokens, "bottom": v.bottom_tokens, "top_scores": v.top_scores,
                               "bottom_scores": v.bottom_scores, "down_projection": v.down_projection}
        except ValueError:
            n["vocabulary"] = None
        if texts is not None:
            windows = top_activating(model, tokenizer, n["latent"], n["neuron"], texts, k=args.windows,
                                     window=args.window, rule=args.rule, backend=backend, progress=not args.quiet)
            n["windows"] = [{"activation": w.activation, "text_index": w.text_index, "position": w.position,
                             "text": w.text, "tokens": w.tokens, "relevance": w.relevance.tolist(),
                             "window_activation": w.window_activation} for w in windows]
    edits = _parse_sets(args, ranked)
    before_after = None
    if edits:
        _check_edits(model, edits, widths)
        before = tokenizer.decode(answer_ids) if args.answer is None else tokenizer.decode(
            longdoc.generate_answer(model, tokenizer, prompt.ids, args.max_new_tokens, backend=backend))
        try:
            with af.intervene(model, edits):
                after = tokenizer.decode(longdoc.generate_answer(model, tokenizer, prompt.ids, args.max_new_tokens,
                                                                 backend=backend))
        except longdoc.InputError:
            after = ""   # (the greedy answer ended at once)
        except (ValueError, RuntimeError, TypeError) as err:
            raise UsageError(f"--set: {err}") from None
        before_after = {"set": list(args.set), "before": before, "after": after}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompt_tokens = prompt.token_text
    answer_text = tokenizer.decode([first])
    data = {"model": args.model, "prompt": prompt.text, "answer": tokenizer.decode(answer_ids),
            "explained_token": answer_text, "target_logit": float(e.target_logit[0]), "rule": args.rule,
            "latents": latents, "tokens": prompt_tokens, "relevance": e.relevance[0].tolist(), "neurons": ranked,
            "explain_seconds": seconds, "intervention": before_after}
    (out / "neurons.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    _html(out, prompt_tokens, e.relevance[0].tolist(), answer_text, ranked, before_after)
    print(f"answer: {data['answer']!r} (explained: its first token {answer_text!r}, logit "
          f"{data['target_logit']:.3f}); the {len(ranked)} most relevant of "
          f"{sum(widths.values())} neurons in {len(latents)} latents:")
    for i, n in enumerate(ranked, 1):
        vocab = ", ".join(repr(t) for t in n["vocabulary"]["top"][:5]) if n["vocabulary"] else "-"
        print(f"{i:>3}. {n['latent']}[{n['neuron']}]  relevance {n['relevance']:+.4g}  activation "
              f"{n['activation']:+.4g}  raises {vocab}")
        for w in n.get("windows", []):
            print(f"       fires {w['activation']:.3g} on: {' '.join(w['text'].split())[-90:]!r}")
    if before_after:
        print(f"with {', '.join(before_after['set'])}: {before_after['before']!r} -> {before_after['after']!r}")
    print(f"wrote {out / 'neurons.json'} and {out / 'neurons.html'}")
    return 0
