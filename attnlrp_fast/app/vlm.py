"""The image job behind `attnlrp-fast explain --image`: which image regions and which words made a vision-language
model (LLaVA) give its answer.

    model, processor = load_model(folder, device, dtype)
    images = load_images(paths)
    prompt = build_prompt(processor, images, question)           # the processor's chat template when it has one
    answer = generate_answer(model, processor, prompt, max_new_tokens=32)
    result = explain_answer(model, prompt, answer, rule="attnlrp")
    paths = write_reports(out, result, ...)                      # overlay_<k>.png, explanation.html, .json
    explain_images(args)                                         # all of it, as `explain --image` runs it

One forward and one backward pass over prompt + answer with the target "sum of the answer tokens' logits"
(af.explain): relevance per prompt token (image placeholders included) and one map per image on the vision
tower's patch grid (explanation.py). The overlay draws the positive relevance of the map over the image as the
model saw it (the processor's resized / cropped pixels, un-normalised).
"""

import base64
import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnlrp_fast.app import report
from attnlrp_fast.app.common import (TINY, Answer, UsageError, bar_factory, check_explain_options, choose_backend,
                                     choose_device, choose_dtype, extend_json, reasoning_span)
from attnlrp_fast.app.longdoc import (InputError, _first_line, _quiet_hub, answer_targets, context_length, greedy,
                                      tokenize_answer)


def check_vision_config(model_id):
    """InputError unless --model is a vision-language model (a config with a vision tower)."""
    from transformers import AutoConfig

    try:
        with _quiet_hub():
            config = AutoConfig.from_pretrained(model_id)
    except Exception as e:
        raise InputError(f"--model {model_id}: cannot load its config ({_first_line(e)})") from None
    if getattr(config, "vision_config", None) is None:
        raise InputError(f"--image: --model {model_id} ({getattr(config, 'model_type', '?')}) has no vision tower; "
                         "images need a vision-language model such as LLaVA")
    return config


def load_model(model_id, device, dtype):
    """The vision-language model and its processor from a folder (or hub id), attention through the engine."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from attnlrp_fast.models import is_vision_language

    check_vision_config(model_id)
    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except Exception as e:
        raise InputError(f"--model {model_id}: cannot load its processor ({_first_line(e)})") from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, attn_implementation="attnlrp_fast")
    except Exception as e:
        raise InputError(f"--model {model_id}: cannot load it as an image-text-to-text model ({_first_line(e)})") \
            from None
    if not is_vision_language(model):
        raise InputError(f"--image: {type(model).__name__} has no vision tower whose image features explain() reads")
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise InputError(f"--model {model_id}: its processor has no tokenizer or image processor")
    return model.to(device).eval(), processor


def load_images(paths):
    """RGB PIL images; InputError for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"--image {path}: no such file")
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"--image {path}: not an image this program can read ({_first_line(e)})") from None
    return images


@dataclass
class Prompt:
    text: str
    inputs: dict              # the processor's tensors: input_ids (1, N), attention_mask, pixel_values, ...
    token_text: list          # a readable string per prompt token
    image_token_id: int

    @property
    def ids(self):
        return self.inputs["input_ids"][0].tolist()


def build_prompt(processor, images, question, chat=True):
    """The question with one image placeholder per image: as the user turn of the processor's chat template when
    it has one, else `<image>` markers then the question."""
    question = (question or "").strip()
    image_token = getattr(processor, "image_token", None) or "<image>"
    if chat and getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    else:
        text = image_token * len(images) + ("\n" + question if question else "")
    inputs = dict(processor(images=images, text=text, return_tensors="pt"))
    tokenizer = processor.tokenizer
    ids = inputs["input_ids"][0].tolist()
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    token_text = [tokenizer.decode([t]) for t in ids]
    return Prompt(text, inputs, token_text, int(image_token_id))


def check_length(model, prompt, answer_tokens, model_id=""):
    limit = getattr(model.config.text_config, "max_position_embeddings", None) or context_length(model)
    n_image = sum(t == prompt.image_token_id for t in prompt.ids)
    n = len(prompt.ids) + answer_tokens
    if limit is not None and n > limit:
        raise InputError(f"the prompt is {len(prompt.ids)} tokens ({n_image} of them image tokens) plus "
                         f"{answer_tokens} answer tokens = {n}, more than the context of {model_id or 'the model'} "
                         f"({limit} tokens); use fewer images")


def _model_inputs(prompt, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prompt.inputs.items()}


def generate_answer(model, processor, prompt, max_new_tokens=32, backend=None):
    """Greedy answer token ids (without the end-of-sequence token)."""
    return greedy(model, processor.tokenizer, _model_inputs(prompt, next(model.parameters()).device), max_new_tokens,
                  backend)


@dataclass
class Result:
    relevance: list           # per prompt + answer token (image placeholders: their image feature's relevance)
    image_maps: list          # per image: (h, w) nested lists on the patch grid
    image_share: float
    text_share: float
    target_logits: list
    seconds: float
    reasoning: dict | None = None   # with a reasoning span: its facts (reasoning_fields)


def explain_answer(model, prompt, answer_ids, rule="attnlrp", backend=None, *, reasoning=None, hops=3, seed=None):
    """Relevance of every prompt + answer token and of every image patch for the sum of the answer's logits.
    reasoning: a longdoc.ReasoningSpan; then the answer explained is what follows it, and the relevance shown
    (prompt tokens, image maps, shares) is all hops' together (af.explain's reasoning_span)."""
    import attnlrp_fast as af

    device = next(model.parameters()).device
    inputs = _model_inputs(prompt, device)
    answer = torch.tensor([answer_ids], device=device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], 1)
    if "attention_mask" in inputs:
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], 1)
    p = len(prompt.ids)
    targets = answer_targets(p, answer_ids, reasoning)
    extra = {k: inputs[k] for k in ("image_sizes", "image_grid_thw", "token_type_ids") if k in inputs}
    if reasoning is not None:
        extra.update(reasoning_span=(reasoning.start, reasoning.end), hops=hops, reasoning_seed=seed)
    t = time.perf_counter()
    e = af.explain(model, input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                   pixel_values=inputs["pixel_values"].to(model.dtype), target=targets, rule=rule, backend=backend,
                   **extra)
    seconds = time.perf_counter() - t
    if reasoning is None:
        return Result(e.relevance[0].cpu().tolist(), [m.cpu().tolist() for m in e.image_relevance],
                      float(e.image_share[0]), float(e.text_share[0]), e.target_logits[0].cpu().tolist(), seconds)
    relevance = torch.cat([e.prompt_relevance[0, :p], e.relevance[0, p:]]).cpu()
    maps = [m.cpu() for m in e.prompt_image_relevance]
    s_img = float(sum(m.sum() for m in maps))
    s_txt = float(relevance[:p][torch.tensor(prompt.ids) != prompt.image_token_id].sum())
    total = s_img + s_txt
    return Result(relevance.tolist(), [m.tolist() for m in maps], s_img / total if total else 0.0,
                  s_txt / total if total else 0.0, e.target_logits[0].cpu().tolist(), seconds,
                  reasoning_fields(reasoning, e, hops))


def reasoning_fields(reasoning, e, hops):
    """The JSON report's "reasoning" entry of an image explanation: the span, the hops, what each hop put on the
    images and left in the reasoning."""
    return {"source": reasoning.source, "span": [reasoning.start, reasoning.end],
            "answer_start": reasoning.answer_start, "hops": hops, "seed": e.reasoning_seed,
            "share_left_in_reasoning": e.reasoning_share[:, 0].cpu().tolist(),
            "image_relevance_per_hop": [float(sum(m.sum() for m in maps)) for maps in e.hop_image_relevance]}


def seen_images(processor, pixel_values):
    """The images as the model saw them: pixel_values un-normalised to (H, W, 3) floats in [0, 1]."""
    ip = processor.image_processor
    mean = np.asarray(getattr(ip, "image_mean", None) or [0.0, 0.0, 0.0], dtype=float)[:, None, None]
    std = np.asarray(getattr(ip, "image_std", None) or [1.0, 1.0, 1.0], dtype=float)[:, None, None]
    out = []
    for px in pixel_values.float().cpu().numpy():
        out.append(np.clip((px * std + mean).transpose(1, 2, 0), 0, 1))
    return out


def plot_overlay(path, image, relevance_map, title=""):
    """A PNG of `image` (H, W, 3) with the positive part of the (h, w) relevance map upsampled over it as a heat
    overlay (transparent where the relevance is 0 or negative); returns its Path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heat = np.clip(np.asarray(relevance_map, dtype=float), 0, None)
    top = heat.max()
    heat = heat / top if top > 0 else heat
    h, w = image.shape[:2]
    fig = Figure(figsize=(5, 5 * h / w + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image, extent=(0, w, h, 0), interpolation="bilinear")
    rgba = np.zeros(heat.shape + (4,))
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 1.0, 1.0 - heat, 0.65 * heat   # yellow -> red, alpha with relevance
    ax.imshow(rgba, extent=(0, w, h, 0), interpolation="bilinear")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def top_regions(image_maps, k=5):
    """[(image, row, col, relevance)] of the k grid cells with the largest relevance over all images."""
    cells = [(i, r, c, v) for i, m in enumerate(image_maps) for r, row in enumerate(m) for c, v in enumerate(row)]
    return sorted(cells, key=lambda cell: -cell[3])[:k]


def top_words(prompt, relevance, k=5):
    """[(index, token text, relevance)] of the k prompt tokens (image placeholders left out) with the largest
    relevance."""
    words = [(i, prompt.token_text[i], relevance[i]) for i, t in enumerate(prompt.ids)
             if t != prompt.image_token_id and prompt.token_text[i].strip()]
    return sorted(words, key=lambda w: -w[2])[:k]


def write_reports(out_dir, prompt, result, images, *, title, facts):
    """overlay_<k>.png per image, explanation.json and explanation.html (overlays inline, beside the prompt's
    token heatmap); returns the paths (json, html, pngs...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = [plot_overlay(out / f"overlay_{k}.png", image, m, title=f"image {k}: positive relevance")
            for k, (image, m) in enumerate(zip(images, result.image_maps))]
    n = len(prompt.ids)
    data = {**facts, "tokens": prompt.token_text, "token_ids": prompt.ids, "relevance": result.relevance[:n],
            "image_token_id": prompt.image_token_id, "image_maps": result.image_maps,
            "image_share": result.image_share, "text_share": result.text_share,
            "target_logits": result.target_logits,
            "top_regions": [{"image": i, "row": r, "col": c, "relevance": v}
                            for i, r, c, v in top_regions(result.image_maps)],
            "overlays": [p.name for p in pngs], **({"reasoning": result.reasoning} if result.reasoning else {})}
    (out / "explanation.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    figures = "".join(
        f'<figure><img alt="image {k} relevance overlay" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"><figcaption>image {k}</figcaption></figure>'
        for k, p in enumerate(pngs))
    text = [(t, r) for t, r, i in zip(prompt.token_text, result.relevance, prompt.ids) if i != prompt.image_token_id]
    heatmap = report.inline_heatmap([t for t, _ in text], [r for _, r in text])
    rows = "".join(f"<tr><th>{html.escape(report.fact_label(k))}</th><td>{html.escape(report.fact_value(v))}</td></tr>"
                   for k, v in facts.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; line-height: 1.6; }}
.row {{ display: flex; gap: 2rem; align-items: flex-start; }} figure {{ margin: 0; }} img {{ max-width: 28rem; }}
.text {{ border: 1px solid #ddd; padding: 1rem; flex: 1; }} th {{ text-align: left; padding-right: 1rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{rows}</table>
<p>share of the relevance on the image(s): {result.image_share:.1%}, on the text: {result.text_share:.1%}
(signed sums; image placeholders' own tokens not counted as text)</p>
<div class="row"><div>{figures}</div><div class="text"><h2>Prompt</h2>{heatmap}</div></div>
</body></html>
"""
    (out / "explanation.html").write_text(page, encoding="utf-8")
    return [out / "explanation.json", out / "explanation.html", *pngs]


def summary(prompt, result, k=5):
    """Terminal lines: the shares, the top image regions (grid cells) and the top words."""
    lines = []
    if result.reasoning:
        r = result.reasoning
        lines.append(f"reasoning: positions {r['span'][0]}..{r['span'][1] - 1} ({r['source']}), {r['hops']} hop(s); "
                     "the shares, regions and words below are all hops together")
        lines += [f"  hop {h}: {on_images:.4g} on the images, {left:.1%} left in the reasoning"
                  for h, (on_images, left) in enumerate(zip(r["image_relevance_per_hop"],
                                                             r["share_left_in_reasoning"]))]
    lines += [f"relevance share: image {result.image_share:.1%}, text {result.text_share:.1%}",
              "top image regions (image, row, column of the patch grid):"]
    for i, r, c, v in top_regions(result.image_maps, k):
        h, w = len(result.image_maps[i]), len(result.image_maps[i][0])
        lines.append(f"  image {i} cell ({r}, {c}) of {h}x{w}  {v:.4g}")
    lines.append("top words:")
    for _, text, v in top_words(prompt, result.relevance, k):
        lines.append(f"  {text.strip()!r}  {v:.4g}")
    return lines


# --- the command ------------------------------------------------------------------------------------------------
def explain_images(args):
    """`attnlrp-fast explain --image`: the steps above from explain's arguments, the reports written and a summary
    printed; the exit status."""
    t0 = time.perf_counter()
    if args.document is not None:
        raise UsageError("--image and --document: explain images with a question, or a document, not both")
    if args.per_token:
        raise UsageError("--per-token is not available with --image")
    if args.model == TINY and not os.path.exists(args.model):
        raise UsageError(f"--image: --model {TINY} is a text-only Llama; images need a vision-language model folder")
    images = load_images(args.image)
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    check_explain_options(args)
    backend = choose_backend(args.backend, device, dtype, many_passes=True)
    bar_factory(args.quiet)   # --quiet: no loading bars
    model, processor = load_model(args.model, device, dtype)
    try:
        prompt = build_prompt(processor, images, args.question, chat=not args.no_chat)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--image: the processor cannot build the prompt ({str(e).splitlines()[0]})") from None
    answer_ids = tokenize_answer(processor.tokenizer, args.answer) if args.answer is not None else None
    check_length(model, prompt, len(answer_ids) if answer_ids else args.max_new_tokens, args.model)
    if answer_ids is None:
        answer_ids = generate_answer(model, processor, prompt, args.max_new_tokens, backend=backend)
    reasoning = reasoning_span(args, processor.tokenizer, Answer(prompt, answer_ids, None))
    result = explain_answer(model, prompt, answer_ids, args.rule, backend, reasoning=reasoning, hops=args.hops,
                            seed=args.reasoning_seed)
    explained = answer_ids[reasoning.answer_start - len(prompt.ids):] if reasoning else answer_ids
    text = processor.tokenizer.decode(explained)
    facts = {"model": args.model, "rule": args.rule, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
             "backend": backend or "triton", "question": args.question, "answer": text,
             "answer_source": "given" if args.answer is not None else "greedy", "images": list(args.image),
             "target_logit": sum(result.target_logits), "prompt_tokens": len(prompt.ids),
             "image_tokens": sum(t == prompt.image_token_id for t in prompt.ids)}
    paths = write_reports(args.out, prompt, result, seen_images(processor, prompt.inputs["pixel_values"]),
                          title=f"Why the model answered {text.strip()[:80]!r}", facts=facts)
    extend_json(paths[0], {"answer_token_ids": answer_ids, "seconds": time.perf_counter() - t0})
    print(f"answer ({facts['answer_source']}): {text.strip()!r}")
    print(f"explained {len(prompt.ids) + len(answer_ids)} tokens ({facts['image_tokens']} image tokens) and "
          f"{len(images)} image(s) with {args.rule} in {result.seconds:.1f} s on {device}")
    for line in summary(prompt, result):
        print(line)
    print("reports: " + ", ".join(str(p) for p in paths))
    return 0
