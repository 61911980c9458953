"""af.explain(): one forward and one backward pass give the relevance of every input token (and of any
module's output) for a target score of a HuggingFace model.

Relevance of token i = sum_d e[i, d] * g(e)[i, d], where e is the output of the model's input-embedding module
and g the modified gradient of the rule (attnlrp_fast/rules.py), seeded with g(target score) = 1 so that the
relevance of the target is its logit. Under Gemma2/3's final logit softcap the identity rule applies there too.
Targets: targets.py; input checks: inputs.py.

Vision-language models (LLaVA: models/llava.py) take input_ids with image placeholder tokens and pixel_values. The
token relevance is then read where the image features meet the text, the language model's inputs_embeds: text
positions as above, and at each image placeholder position the relevance of the projected image feature placed
there. The image relevance is read where the pixels enter, at the vision tower's patch-embedding output (pixels ->
one embedding per patch, before the CLS token and the position embeddings are added): relevance of patch (i, j) =
sum_d p[d, i, j] * g(p)[d, i, j], one (h, w) map per image on the patch grid (the CLS token, the position
embeddings and biases take their share of the relevance too, so the maps do not sum to the placeholder positions'
relevance). image_share / text_share per row: S_img = the signed sum of the row's images' patch relevance,
S_txt = the signed sum of the relevance at its positions that are not image placeholders;
image_share = S_img / (S_img + S_txt), text_share = S_txt / (S_img + S_txt) (they sum to 1; signed relevance can
make one negative or above 1; both 0 where S_img + S_txt = 0).
Qwen2-VL / Qwen2.5-VL (models/qwen2_vl.py): pixel_values are flattened (t, h, w) patches in spatial-merge window
order and the patch embedding a Conv3d with one output per patch; each patch's relevance is mapped back to its cell
of the (h, w) grid of image_grid_thw (summed over temporal patches), and explain() passes the model the
mm_token_type_ids its processor would (1 at image placeholders). Images there may differ in size: image k fills
t * h * w / merge^2 placeholders.
"""

import contextlib
import os
import traceback
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional

import torch

from attnlrp_fast.context_parallel import of_model
from attnlrp_fast.host_memory import compact_malloc
from attnlrp_fast.inputs import check_decoder_inputs, check_inputs, forward_parameters, model_device
from attnlrp_fast.lrp_patch import lrp_scope, unwrap
from attnlrp_fast.memory import OFFLOAD_ATTR, maybe_low_memory
from attnlrp_fast.models import UnsupportedModelError, is_vision_language, vision_parts
from attnlrp_fast.reasoning import HeadRows, HopShards, Reasoning, run_hops
from attnlrp_fast.rules import final_softcap_identity
from attnlrp_fast.targets import Contrast, Neuron, contrast, latent_hint, score, token_positions  # noqa: F401 (contrast: af.contrast)


@dataclass(repr=False)
class Explanation:
    """What af.explain() returns (B: batch rows, N: input positions, P: targets per row). Its fields:

    relevance         (B, N) float32: each input token's relevance (a ViT's: each image patch's)
    target_ids        (B,) the explained token or class ids; (B, P) for a list of (position, token) targets; None
                      for a callable target; (B, K) the neuron indices for an af.neuron target
    target_logit      (B,) float32: the explained score, which is the total relevance seeded (af.neuron: the
                      activation)
    rule              "attnlrp", "cp" or "grad"
    latent            {name: (B, N, D) float32}: the relevance of each module output asked for with latent= ("name"),
                      or of its input ("name:input"); {} when none was
    positions         (B,) or (B, P): the positions whose logits were explained; None for a callable target (an
                      af.neuron target: the positions it reads, None when summed over all)
    target_logits     (B, P) float32: each (position, token) target's own logit; None for other targets

    A vision-language model's (module docstring), else None:
    image_relevance   one (h, w) float32 map per image on its patch grid, in pixel_values' order
    image_rows        (images,): the batch row each image belongs to
    image_share       (B,) float32: the signed share of a row's relevance on its images
    text_share        (B,) float32: the share on its text tokens (image_share + text_share = 1)

    An encoder-decoder model's (decoder_input_ids=...), else None:
    decoder_relevance (B, M) float32: each decoder input token's relevance (`relevance` is the encoder tokens')

    With per_target=True (a list target: each (position, token) target explained on its own), else None:
    target_relevance  (B, P, N) float32: each target's relevance; they sum over P to `relevance`

    With context_parallel and gather=False (af.context_parallel), else None:
    shard_positions   (n_r,) the global positions of `relevance`'s columns, the shard this rank held

    With reasoning_span= (the relevance carried back through a reasoning span, attnlrp_fast/reasoning.py), else None:
    reasoning_span    (start, end): the positions of the reasoning tokens
    hop_relevance     (hops + 1, B, N) float32: each hop's relevance; hop 0 is `relevance`
    prompt_relevance  (B, N) float32: all hops' relevance on the positions before the reasoning
    reasoning_share   (hops + 1, B) float32: the share of each hop's relevance left in the reasoning
    reasoning_seed    "positive" or "signed": what each hop passes on
    reasoning_skipped the number of reasoning tokens with a logit of 0, which pass nothing on (0 without a span)
    hop_image_relevance     per hop, one (h, w) map per image (hop 0 is image_relevance)
    prompt_image_relevance  per image, the sum of its maps over all hops

    repr() shows the fields not left at their default (None, {}, 0), tensors as their shape and dtype.
    """
    relevance: torch.Tensor
    target_ids: Optional[torch.Tensor]
    target_logit: torch.Tensor
    rule: str
    latent: dict = field(default_factory=dict)
    positions: Optional[torch.Tensor] = None
    target_logits: Optional[torch.Tensor] = None
    target_relevance: Optional[torch.Tensor] = None
    image_relevance: Optional[list] = None
    image_rows: Optional[torch.Tensor] = None
    image_share: Optional[torch.Tensor] = None
    text_share: Optional[torch.Tensor] = None
    reasoning_span: Optional[tuple] = None
    hop_relevance: Optional[torch.Tensor] = None
    prompt_relevance: Optional[torch.Tensor] = None
    reasoning_share: Optional[torch.Tensor] = None
    reasoning_seed: Optional[str] = None
    reasoning_skipped: int = 0
    hop_image_relevance: Optional[list] = None
    prompt_image_relevance: Optional[list] = None
    decoder_relevance: Optional[torch.Tensor] = None
    shard_positions: Optional[torch.Tensor] = None

    def __repr__(self):
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else None)
            if value is None or (not isinstance(value, torch.Tensor) and value == default):
                continue
            shown.append(f"{f.name}={_summary(value)}")
        return f"Explanation({', '.join(shown)})"

    def top_neurons(self, name: str, k: int = 10):
        """The k neurons of latent `name` with the largest relevance summed over batch and positions:
        (values, indices), each (k,)."""
        r = self._latent(name)
        total = r.reshape(-1, r.shape[-1]).sum(0)
        return total.topk(min(k, total.numel()))

    def head_relevance(self, name: str, num_heads: int) -> torch.Tensor:
        """Relevance of latent `name` (e.g. "model.layers.3.self_attn.o_proj:input") per attention head:
        (B, N, num_heads)."""
        r = self._latent(name)
        if r.shape[-1] % num_heads:
            raise ValueError(f"latent {name!r} has {r.shape[-1]} features, not a multiple of {num_heads} heads")
        return r.reshape(*r.shape[:-1], num_heads, -1).sum(-1)

    def _latent(self, name):
        if name not in self.latent:
            raise KeyError(f"no latent {name!r}; explained latents: {sorted(self.latent)}")
        return self.latent[name]


def _summary(value):
    """A tensor as its shape and dtype (in lists, tuples and dicts too); anything else as repr() shows it."""
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={str(value.dtype).removeprefix('torch.')})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_summary(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_summary(v) for v in value) + "]"
    if isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
        return "(" + ", ".join(_summary(v) for v in value) + ")"
    return repr(value)


def explain(model, input_ids=None, attention_mask=None, target=None, rule=None, latent=(), backend=None, *,
            position=None, pixel_values=None, checkpoint=False, mlp_chunk=1024, progress=None, image_sizes=None,
            image_grid_thw=None, token_type_ids=None, reasoning_span=None, hops=None,
            reasoning_seed=None, per_target=False, family=None, decoder_input_ids=None,
            decoder_attention_mask=None, offload=None, seq_chunk=None, context_parallel=None) -> Explanation:
    """Explain `target` of `model` on `input_ids` (or `pixel_values` for ViT; both for a vision-language model, with
    `image_sizes` / `image_grid_thw` / `token_type_ids` (Gemma 3: which tokens are image tokens, whose blocks
    attend both ways) passed on to it when given) with `rule`.

    target: None = argmax at the target position (classification heads: the argmax class); an int token/class id;
            a list of (position, token_id) pairs (relevance of the sum of their logits); contrast(a, b) for
            logit(a) - logit(b); a callable f(model_outputs) -> (B,) tensor (any scalar of the output); or
            af.neuron(latent, index, position) for the activation of a hidden neuron (attnlrp_fast/neurons.py).
    rule: "attnlrp" (default), "cp" or "grad"; inside `with af.lrp(model, rule)` the active rule (a different one
          is an error). explain() applies lrp(model, rule) for the call when the model is not inside lrp().
    latent: module names whose output relevance to return; "name:input" for the module's input instead.
    position: the position whose logits int/None/contrast targets read (default: each row's last real token).
    checkpoint: checkpoint every transformer layer and run MLPs in chunks of `mlp_chunk` tokens (af.low_memory),
          for long inputs: memory O(N * hidden) with a small constant, at the cost of a second forward.
    offload: "cpu" keeps those checkpoints (one B x N x hidden input per layer) in host memory, brought back one
          layer ahead of the backward (af.low_memory's offload; implies checkpoint=True).
    seq_chunk: run each layer's forward, recomputation and backward in chunks of this many positions, only its keys
          and values full length (attnlrp_fast/seqchunk.py; implies checkpoint=True); the same relevance.
    context_parallel: a torch.distributed process group (True: the default group) whose ranks share the positions
          (attnlrp_fast/context_parallel.py): call explain() on every rank with the same inputs; the relevance comes
          back to every rank. Also af.context_parallel(model, group) as a scope. Token targets of causal LMs.
    progress: called with "forward" / "backward" per transformer layer (progress bars), and with per_target "target"
          after each target's backward pass.
    per_target: with a list of (position, token_id) targets, one backward pass per target over the one forward:
          e.target_relevance (B, P, N), each target's own map (their sum is e.relevance).
    Vision-language models: e.image_relevance, e.image_rows, e.image_share, e.text_share (module docstring).
    reasoning_span: (start, end), the positions of the model's own reasoning tokens before the answer; `hops`
          (default 1) further backward passes over the same forward carry the relevance each reasoning token
          received back to the logit that predicted it (reasoning_seed "positive" (default): its positive part;
          "signed": all of it). e.hop_relevance, e.prompt_relevance (the total on the prompt), e.reasoning_share
          (attnlrp_fast/reasoning.py); e.relevance stays hop 0.
    family: an af.FamilyMap for a model the built-in maps and the generic rules do not cover (af.lrp's).
    decoder_input_ids / decoder_attention_mask: an encoder-decoder model's (T5, BART) decoder tokens (B, M); the
          target is read from the decoder's logits (default: its last real position), e.relevance is on the encoder
          tokens (input_ids) and e.decoder_relevance on the decoder tokens.
    """
    model = unwrap(model)   # a torch.compile wrapper: explain the model inside it (its signature, its modules)
    if model_device(model).type == "cpu":
        compact_malloc()    # freed blocks back to the system: resident memory = live tensors (host_memory.py)
    if _hf_checkpointing(model) and not checkpoint:
        # HF's checkpointing runs in training mode only and explain() runs in eval mode: its own is used instead
        warnings.warn("the model has HF activation (gradient) checkpointing enabled, which runs in training mode "
                      "only; explain() runs in eval mode and checkpoints every layer itself instead (checkpoint=True)",
                      stacklevel=2)
        checkpoint = True
    cp = of_model(model, context_parallel)
    if cp is not None and seq_chunk is not None:
        raise ValueError("seq_chunk and context_parallel cannot be combined (each rank holds a shard of the "
                         "sequence already: add ranks, or offload='cpu', instead)")
    if offload is not None or seq_chunk is not None:
        checkpoint = True
    with lrp_scope(model, rule, backend, caller="explain()", family=family) as h, \
            maybe_low_memory(model, checkpoint or progress is not None, checkpoint=checkpoint,
                             mlp_chunk=mlp_chunk if checkpoint else 0, progress=progress, offload=offload,
                             seq_chunk=seq_chunk):
        extra = {k: v for k, v in (("image_sizes", image_sizes), ("image_grid_thw", image_grid_thw),
                                   ("token_type_ids", token_type_ids)) if v is not None}
        reasoning = Reasoning.of(reasoning_span, hops, reasoning_seed, input_ids)
        if per_target and (reasoning is not None or callable(target) or not isinstance(target, (list, tuple))):
            raise ValueError("per_target=True needs a list of (position, token_id) targets and no reasoning_span")
        decoder = check_decoder_inputs(model, input_ids, decoder_input_ids, decoder_attention_mask)
        if isinstance(target, Neuron) and (reasoning is not None or decoder is not None or input_ids is None):
            raise ValueError("a neuron target explains a language model's input_ids; not with reasoning_span, "
                             "decoder_input_ids or without input_ids")
        if decoder is not None and (reasoning is not None or pixel_values is not None):
            raise ValueError("decoder_input_ids cannot be combined with reasoning_span or pixel_values")
        req = Request(input_ids, attention_mask, target, position, pixel_values,
                      (latent,) if isinstance(latent, str) else tuple(latent), extra, reasoning, per_target, progress,
                      decoder)
        return _explain(model, h, req) if cp is None else _explain_sharded(model, h, req, cp)


def _hf_checkpointing(model):
    """Whether HF activation checkpointing is on (transformers 5: is_activation_checkpointing, earlier releases:
    is_gradient_checkpointing, deprecated since)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


class _Capture:
    """Forward hooks: the input-embedding output as a leaf that requires grad, latent outputs/inputs, and the
    output-embedding (lm_head) output for the final-softcap identity rule; for a vision-language model (`vision`: its
    VisionParts) also the patch embeddings as a leaf and the language model's inputs_embeds (image features placed)."""

    def __init__(self, model, latent, want_pre_logits, vision=None, decoder=False):
        self.handles, self.latent, self.embeds, self.pre_logits = [], {}, None, None
        self.decoder_embeds = None
        self.merged = self.patches = None
        self.frozen = False  # set after the forward: checkpointed layers re-run their hooks in the backward
        if vision is not None:
            self.handles.append(vision.patch_embedding.register_forward_hook(self._leaf("patches")))
            self.handles.append(vision.language_model.register_forward_pre_hook(self._merged_hook, with_kwargs=True))
        emb = _part_embeddings(model, "get_encoder") if decoder else model.get_input_embeddings()
        if emb is None:
            raise ValueError(f"{type(model).__name__} has no input-embedding module (get_input_embeddings())")
        if decoder:
            dec = _part_embeddings(model, "get_decoder")
            if dec is emb:   # one module for both (the encoder runs first)
                self.handles.append(emb.register_forward_hook(self._leaf("embeds", then="decoder_embeds")))
            else:
                self.handles.append(emb.register_forward_hook(self._leaf("embeds")))
                self.handles.append(dec.register_forward_hook(self._leaf("decoder_embeds")))
        else:
            self.handles.append(emb.register_forward_hook(self._leaf("embeds")))
        for spec in latent:
            name, _, where = spec.partition(":")
            if where not in ("", "input"):
                raise ValueError(f"latent {spec!r}: use 'module.name' or 'module.name:input'")
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"latent {spec!r}: the model has no module named {name!r}") from None
            if where == "input":
                self.handles.append(module.register_forward_pre_hook(self._store(spec, from_input=True)))
            else:
                self.handles.append(module.register_forward_hook(self._store(spec)))
        if want_pre_logits:
            head = model.get_output_embeddings()
            self.handles.append(head.register_forward_hook(self._pre_logits_hook))

    def _leaf(self, attr, then=None):
        """A forward hook that replaces the module's output by a detached leaf that requires grad, kept as `attr`
        (as `then` from the second call on, when one module embeds both an encoder's and a decoder's tokens)."""
        def hook(module, inputs, output):
            if self.frozen:
                return None
            name = then if then is not None and getattr(self, attr) is not None else attr
            setattr(self, name, output.detach().requires_grad_(True))
            return getattr(self, name).clone()
            # a copy goes on: models that scale their embeddings in place (CTRL, GIT) would otherwise write into the
            # leaf, which autograd refuses
        return hook

    def _pre_logits_hook(self, module, inputs, output):
        if not self.frozen:   # (after the forward the reasoning hops run the lm_head on their own rows)
            self.pre_logits = output

    def _merged_hook(self, module, args, kwargs):
        if not self.frozen:
            self.merged = kwargs.get("inputs_embeds")

    def _store(self, spec, from_input=False):
        def hook(module, *args):
            if self.frozen:
                return
            value = args[0] if from_input else args[1]
            if isinstance(value, (tuple, list)):
                value = value[0]
            self.latent[spec] = value
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def inputs(self, latent):
        """The tensors whose relevance is asked for: the input embeddings (a vision-language model's: the language
        model's inputs_embeds), then each latent in order, then a vision-language model's patch embeddings."""
        missing = [k for k in latent if k not in self.latent]
        if missing:
            raise ValueError(f"latent modules {missing} did not run in the forward pass{latent_hint(missing[0])}")
        first = self.merged if self.merged is not None else self.embeds
        return [first] + [self.latent[k] for k in latent] + ([self.patches] if self.patches is not None else []) + \
            ([self.decoder_embeds] if self.decoder_embeds is not None else [])


@dataclass
class Request:
    """What one explain() call asks for (inputs checked by inputs.check_inputs)."""
    input_ids: Optional[torch.Tensor]
    attention_mask: Optional[torch.Tensor]
    target: object
    position: Optional[int]
    pixel_values: Optional[torch.Tensor]
    latent: tuple
    extra: dict = field(default_factory=dict)   # other model inputs passed on as they are (image_sizes, ...)
    reasoning: Optional[Reasoning] = None
    per_target: bool = False
    progress: Optional[object] = None           # called with "target" after each target's backward (per_target)
    decoder: Optional[tuple] = None             # an encoder-decoder model's (decoder_input_ids, decoder_attention_mask)

    def target_tokens(self):
        """(ids, mask) the target's positions are read from: the decoder's tokens for an encoder-decoder model."""
        return self.decoder if self.decoder is not None else (self.input_ids, self.attention_mask)


@dataclass
class Scored:
    """The target score of one forward, per row, with what it was read from."""
    score: torch.Tensor                     # (B,)
    ids: Optional[torch.Tensor]
    parts: Optional[torch.Tensor]           # (B, P) per-target logits for a list target
    logits: Optional[torch.Tensor]
    positions: Optional[torch.Tensor]


def _forward_kwargs(model, req):
    """The model's keyword arguments, and the positions / kept logits a token target reads (logits_to_keep: the
    forward computes logits only where the target reads them)."""
    forward_args = forward_parameters(model)
    kwargs = dict(req.extra)
    if req.pixel_values is not None:
        kwargs["pixel_values"] = req.pixel_values
    if req.input_ids is not None:
        kwargs["input_ids"] = req.input_ids
        if req.attention_mask is not None:
            kwargs["attention_mask"] = req.attention_mask
    if req.decoder is not None:
        kwargs["decoder_input_ids"] = req.decoder[0]
        if req.decoder[1] is not None:
            kwargs["decoder_attention_mask"] = req.decoder[1]
    if "use_cache" in forward_args or is_vision_language(model):   # (LLaVA passes it on to its language model)
        kwargs["use_cache"] = False
    positions = kept = None
    if isinstance(req.target, Neuron):   # read from a latent: the logits are not needed, one row of them is kept
        if "logits_to_keep" in forward_args:
            kwargs["logits_to_keep"] = 1
        return kwargs, positions, kept
    if not callable(req.target) and req.input_ids is not None and "logits_to_keep" in forward_args:
        positions = token_positions(req.target, *req.target_tokens(), req.position)
        # the distinct positions; on the meta device (af.estimate_memory) their count is unknown: one per target
        # position is the most it can be
        kept = positions[0] if positions.is_meta else torch.unique(positions)
        kwargs["logits_to_keep"] = kept
    return kwargs, positions, kept


def _reasoning_rows(model, req, kwargs, positions, kept):
    """The lm_head hook that keeps the reasoning's rows (reasoning.HeadRows); the forward then computes logits at
    the target's positions and the reasoning's (logits_to_keep), the lm_head only at the target's."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head): reasoning_span needs a model "
                         "that predicts tokens")
    req.reasoning.check_target(positions)
    union = None
    if kept is not None:
        union = torch.unique(torch.cat([kept, req.reasoning.predicting.to(kept.device)]))
        kwargs["logits_to_keep"] = union
    return HeadRows(head, req.reasoning, union, kept)


def _target_score(model, req, outputs, positions, kept) -> Scored:
    target = req.target
    if callable(target) and not isinstance(target, Contrast):
        value = target(outputs)
        if not isinstance(value, torch.Tensor) or value.dim() > 1:
            raise TypeError("a callable target must return a (B,) tensor or a scalar tensor")
        return Scored(value.reshape(-1), None, None, getattr(outputs, "logits", None), positions)
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(f"{type(model).__name__} returns no logits: pass target as a callable "
                         "f(outputs) -> (B,) (e.g. a similarity of pooled embeddings)")
    if positions is None and logits.dim() == 3:
        positions = token_positions(target, *req.target_tokens(), req.position)
    value, ids, parts = score(target, logits, positions, kept)
    return Scored(value, ids, parts, logits, positions)


def _neuron_score(req, capture) -> Scored:
    """An af.neuron target's score: the neuron's activation, read from the captured latent."""
    t = req.target
    if t.latent not in capture.latent:
        raise ValueError(f"neuron target: latent {t.latent!r} did not run in the forward pass{latent_hint(t.latent)}")
    value = t.read(capture.latent[t.latent], req.input_ids, req.attention_mask)
    B = req.input_ids.shape[0]
    ids = torch.tensor(t.index, device=req.input_ids.device).expand(B, -1)
    positions = None if t.position is None else \
        t.positions(req.input_ids, req.attention_mask, req.input_ids.shape[1]).argmax(-1)
    return Scored(value, ids, None, None, positions)


def _modified_gradients(scored, inputs, pre_logits, softcap, keep=False, score=None):
    """The rule's gradients of the target score (or of `score`, a part of it) at `inputs`; under a final logit
    softcap the identity rule there. keep: the forward's graph stays for further backward passes (reasoning hops,
    per-target passes)."""
    score = scored.score if score is None else score
    if softcap is not None and scored.logits is not None and pre_logits is not None:
        (g_capped,) = torch.autograd.grad(score.sum(), scored.logits, retain_graph=True)
        return torch.autograd.grad(pre_logits, inputs, grad_outputs=final_softcap_identity(g_capped, scored.logits,
                                                                                           pre_logits),
                                   allow_unused=True, retain_graph=keep)
    return torch.autograd.grad(score.sum(), inputs, allow_unused=True, retain_graph=keep)


def _per_target_gradients(scored, inputs, pre_logits, softcap, progress):
    """One backward pass per target (a column of scored.parts) over the one forward: (the gradients summed over the
    targets, as one pass for the whole score gives them; each target's relevance at inputs[0], (B, P, N))."""
    total, maps = None, []
    n = scored.parts.shape[1]
    for j in range(n):
        grads = _modified_gradients(scored, inputs, pre_logits, softcap, keep=j < n - 1, score=scored.parts[:, j])
        g0 = grads[0]
        maps.append(_token_relevance(inputs[0], g0))
        total = list(grads) if total is None else [a if b is None else (b if a is None else a + b)
                                                   for a, b in zip(total, grads)]
        if progress is not None:
            progress("target")
    return total, torch.stack(maps, 1)


@contextlib.contextmanager
def _parameters_frozen(model):
    """No parameter gradients for the duration (they are not asked for, and would cost memory)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _part_embeddings(model, getter):
    """The input-embedding module an encoder-decoder model's encoder ("get_encoder") or decoder ("get_decoder")
    calls (BART's parts embed with modules of their own that share the weights of model.shared)."""
    part = getattr(model, getter)() if hasattr(model, getter) else None
    emb = getattr(part, "embed_tokens", None)
    if emb is None and part is not None and hasattr(part, "get_input_embeddings"):
        emb = part.get_input_embeddings()
    if emb is None:
        raise UnsupportedModelError(f"{type(model).__name__}: no input-embedding module found in its {getter[4:]}")
    return emb


def _check_embedded(model, capture, input_ids, decoder):
    """The captured embeddings are those of the tokens given (LED, which pads its input to its attention window and
    embeds the padding in a call of its own, is refused: which call holds the tokens cannot be told). True when the
    model embeds sequence-first, (N, B, D) (XLNet)."""
    pairs = [] if capture.merged is not None or input_ids is None else [(capture.embeds, input_ids, "input")]
    if decoder is not None:
        pairs.append((capture.decoder_embeds, decoder[0], "decoder input"))
    seq_first = bool(pairs) and pairs[0][0] is not None and decoder is None and input_ids.shape[0] != \
        input_ids.shape[1] and tuple(pairs[0][0].shape[:2]) == tuple(input_ids.shape)[::-1]
    if seq_first:
        return True
    for emb, ids, what in pairs:
        if emb is None or tuple(emb.shape[:2]) != tuple(ids.shape):
            got = "nothing" if emb is None else f"{tuple(emb.shape[:2])} embedded"
            raise UnsupportedModelError(f"{type(model).__name__}: its {what} embedding ran on other tokens than the "
                                        f"{tuple(ids.shape)} given ({got}): the tokens' relevance cannot be read there")
    return False


def _model_forward(model, kwargs):
    """model(**kwargs); an error raised inside transformers' modeling code (inputs were checked before) means the
    model's own code does something the engine cannot serve (it reads the attention mask as a 4-D tensor, builds its
    own, ...): an UnsupportedModelError naming the model, where its code failed and why, in one line."""
    try:
        return model(**kwargs)
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError, NotImplementedError) as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        last = frames[-1] if frames else None
        if last is None or "transformers" + os.sep + "models" not in last.filename:
            raise
        where = f"{os.path.basename(last.filename)}:{last.lineno} ({last.name})"
        reason = " ".join(str(exc).split())[:200]
        raise UnsupportedModelError(f"{type(model).__name__}: its own code at {where} fails under the explanation "
                                    f"engine: {type(exc).__name__}: {reason}") from exc


def _explain(model, handle, req: Request) -> Explanation:
    vision = vision_parts(model) if is_vision_language(model) else None
    # (Qwen2-VL: flattened patches, their layout checked by the VisionParts, the rest by check_inputs on a view)
    pixels = req.pixel_values if vision is None else vision.checked_pixels(req.pixel_values, req.extra)
    input_ids, attention_mask = check_inputs(model, req.input_ids, req.attention_mask, pixels)
    extra = req.extra if vision is None else {**req.extra, **vision.model_inputs(model, input_ids, req.extra)}
    req = Request(input_ids, attention_mask, req.target, req.position, req.pixel_values, req.latent, extra,
                  req.reasoning, req.per_target, req.progress, req.decoder)
    softcap = handle.final_logit_softcap if handle.rule != "grad" else None
    read = req.latent + ((req.target.latent,) if isinstance(req.target, Neuron) else ())
    if read and getattr(model, OFFLOAD_ATTR, None):
        raise ValueError(f"latent={list(read)}: latents are read from the forward's graph, and with "
                         "offload='cpu' each layer's forward runs without one (its backward recomputes it); explain "
                         "latents without offload (checkpoint=True keeps the memory linear)")
    capture = _Capture(model, tuple(dict.fromkeys(read)), want_pre_logits=softcap is not None, vision=vision,
                       decoder=req.decoder is not None)
    rows = hops = per_target = None
    try:
        kwargs, positions, kept = _forward_kwargs(model, req)
        if req.reasoning is not None:
            rows = _reasoning_rows(model, req, kwargs, positions, kept)
        with _parameters_frozen(model), torch.enable_grad():
            outputs = _model_forward(model, kwargs)
            capture.frozen = True
            scored = _neuron_score(req, capture) if isinstance(req.target, Neuron) else \
                _target_score(model, req, outputs, positions, kept)
            inputs = capture.inputs(req.latent)
            seq_first = _check_embedded(model, capture, input_ids, req.decoder)
            if rows is not None:
                req.reasoning.check_target(scored.positions)
                z = rows.logits(input_ids, handle.final_logit_softcap if handle.rule == "grad" else None)
            if req.per_target:
                grads, per_target = _per_target_gradients(scored, inputs, capture.pre_logits, softcap, req.progress)
            else:
                grads = _modified_gradients(scored, inputs, capture.pre_logits, softcap, keep=rows is not None)
            handle.check_engine_used()
            if rows is not None:
                hops = run_hops(req.reasoning, _token_relevance(inputs[0], grads[0]), z,
                                inputs[0], lambda m: warnings.warn(m, stacklevel=4),
                                others=[capture.patches] if capture.patches is not None else [])
    finally:
        capture.remove()
        if rows is not None:
            rows.remove()
    # the tokens' relevance summed over the hidden dim block by block; the latents' and image patches' kept whole
    tokens = _token_relevance(inputs[0], grads[0])
    if seq_first:   # (XLNet embeds (N, B, D): the relevance comes back as (B, N))
        tokens = tokens.transpose(0, 1)
    rel = [None] + [(x.detach().float() * (g.float() if g is not None else 0.0)) for x, g in zip(inputs[1:], grads[1:])]
    fields = {} if per_target is None else {"target_relevance": per_target}
    if req.decoder is not None:
        fields["decoder_relevance"] = _token_relevance(inputs[-1], grads[-1])
        rel = rel[:-1]
    if capture.patches is not None:
        maps, counts = vision.image_maps(rel[-1], req.extra)
        fields = _image_fields(tokens, maps, counts, input_ids == vision.image_token_id)
        rel = rel[:-1]
    if hops is not None:
        r = req.reasoning
        fields.update(reasoning_span=(r.start, r.end), hop_relevance=hops.relevance, prompt_relevance=hops.prompt,
                      reasoning_share=hops.share, reasoning_seed=r.seed, reasoning_skipped=hops.skipped)
        if capture.patches is not None:
            per_hop = [fields["image_relevance"]] + [vision.image_maps(o[0], req.extra)[0] for o in hops.others]
            fields.update(hop_image_relevance=per_hop,
                          prompt_image_relevance=[sum(maps) for maps in zip(*per_hop)])
    return Explanation(
        relevance=tokens, target_ids=scored.ids, target_logit=scored.score.detach().float(),
        rule=handle.rule, latent=dict(zip(req.latent, rel[1:])), positions=scored.positions,
        target_logits=scored.parts.detach().float() if scored.parts is not None else None, **fields)


def _explain_sharded(model, handle, req: Request, cp) -> Explanation:
    """explain() with the positions sharded over the ranks of a process group (attnlrp_fast/context_parallel.py)."""
    what = [name for name, asked in (("pixel_values", req.pixel_values is not None), ("latent", bool(req.latent)),
                                     ("per_target", req.per_target), ("decoder_input_ids", req.decoder is not None),
                                     ("reasoning_span and gather=False (the hops' seeds need the whole relevance)",
                                      req.reasoning is not None and not cp.gather), ("image inputs", bool(req.extra)),
                                     ("a callable target", callable(req.target) and not isinstance(req.target,
                                                                                                   Contrast)),
                                     ("a neuron target", isinstance(req.target, Neuron)))
            if asked]
    if what:
        raise ValueError(f"context_parallel explains token targets of a causal LM's input_ids; not with "
                         f"{', '.join(what)}")
    input_ids, attention_mask = check_inputs(model, req.input_ids, req.attention_mask, None)
    padded = attention_mask is not None and not bool(attention_mask.all())
    cp.check_model(model, padded)
    cp.check_same(input_ids, attention_mask if attention_mask is not None else torch.ones(()), repr(req.target),
                  repr(req.position))
    B, N = input_ids.shape
    positions = token_positions(req.target, input_ids, attention_mask, req.position)     # (B, P), global
    softcap = handle.final_logit_softcap if handle.rule != "grad" else None
    with cp.sharded(model, N, attention_mask, input_ids.device) as idx:
        local = torch.searchsorted(idx, positions.contiguous()).clamp(max=idx.numel() - 1)
        owned = idx[local] == positions
        if positions.is_meta:   # af.estimate_memory: rank 0, which holds the last position, holds the target
            owned = torch.ones_like(positions, dtype=torch.bool)
            kept = local[0]
        else:
            kept = torch.unique(local[owned])
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        kwargs = dict(input_ids=input_ids[:, idx], attention_mask=mask[:, idx], position_ids=idx.expand(B, -1),
                      use_cache=False, logits_to_keep=kept)
        rows = hops = None
        if req.reasoning is not None:
            rows, held = _sharded_reasoning_rows(model, req, kwargs, positions, kept, idx)
        capture = _Capture(model, (), want_pre_logits=softcap is not None)
        try:
            with _parameters_frozen(model), torch.enable_grad():
                outputs = _model_forward(model, kwargs)
                capture.frozen = True
                cp.check_calls()
                scored = _sharded_score(req.target, outputs.logits, positions, local, owned, kept, cp)
                inputs = capture.inputs(())
                _check_embedded(model, capture, kwargs["input_ids"], None)
                if rows is not None:
                    z = _sharded_reasoning_logits(rows, held, input_ids, handle)
                grads = _modified_gradients(scored, inputs, capture.pre_logits, softcap, keep=rows is not None)
                handle.check_engine_used()
                tokens = _token_relevance(inputs[0], grads[0])
                if cp.gather:
                    tokens = cp.gather_positions(tokens, N)
                if rows is not None:
                    shards = HopShards(held, outputs.logits.sum() * 0.0, lambda t: cp.gather_positions(t, N), cp)
                    hops = run_hops(req.reasoning, tokens, z, inputs[0], lambda m: warnings.warn(m, stacklevel=4),
                                    shards=shards)
        finally:
            capture.remove()
            if rows is not None:
                rows.remove()
        fields = {"shard_positions": idx} if not cp.gather else {}
        if hops is not None:
            r = req.reasoning
            fields.update(reasoning_span=(r.start, r.end), hop_relevance=hops.relevance, prompt_relevance=hops.prompt,
                          reasoning_share=hops.share, reasoning_seed=r.seed, reasoning_skipped=hops.skipped)
    parts = None if scored.parts is None else cp.all_sum(scored.parts.detach().float())
    return Explanation(relevance=tokens, target_ids=scored.ids, target_logit=cp.all_sum(scored.score.detach().float()),
                       rule=handle.rule, positions=positions, target_logits=parts, **fields)


def _sharded_reasoning_rows(model, req, kwargs, positions, kept, idx):
    """_reasoning_rows on a shard: the lm_head hook keeps the rows of the reasoning logits whose predicting positions
    this rank holds (local indices), and the forward's logits_to_keep takes them beside the target's. Returns the
    hook and which of the span's tokens are held here ((R,) bool)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head): reasoning_span needs a model "
                         "that predicts tokens")
    req.reasoning.check_target(positions)
    predicting = req.reasoning.predicting.to(idx.device)
    at = torch.searchsorted(idx, predicting).clamp(max=idx.numel() - 1)
    held = idx[at] == predicting
    union = torch.unique(torch.cat([kept, at[held]]))
    kwargs["logits_to_keep"] = union
    return HeadRows(head, req.reasoning, union, kept, predicting=at[held]), held


def _sharded_reasoning_logits(rows, held, input_ids, handle):
    """(B, R) reasoning logits: those held here from the kept rows, zeros (outside the graph) elsewhere."""
    r = rows.reasoning
    tokens = input_ids[:, r.start:r.end][:, held.to(input_ids.device)]
    z_held = rows.logits(input_ids, handle.final_logit_softcap if handle.rule == "grad" else None, tokens=tokens)
    z = z_held.new_zeros(z_held.shape[0], r.end - r.start)
    return z.index_copy(1, held.nonzero()[:, 0].to(z.device), z_held)


def _sharded_score(target, logits, positions, local, owned, kept, cp) -> Scored:
    """This rank's share of the target score: the logits of the targets at the positions it holds (zeros
    elsewhere, still joined to its graph, so that its backward runs with the others'); the argmax of a None target
    taken where it is held and shared with every rank."""
    B, P = positions.shape
    if kept.numel():
        col = torch.searchsorted(kept, local.contiguous()).clamp(max=kept.numel() - 1)
        picked = logits[torch.arange(B, device=logits.device)[:, None], col]
        sel = torch.where(owned[..., None], picked, torch.zeros((), dtype=picked.dtype, device=picked.device))
    else:   # (B, 0, V): no target here
        sel = logits.sum() * 0.0 + logits.new_zeros((B, P, logits.shape[-1]))
    if target is None:
        ids = torch.where(owned, sel.detach().argmax(-1), 0)
        target = cp.all_sum(ids)[:, 0]
    value, ids, parts = score(target, sel, torch.arange(P, device=sel.device).expand(B, P), None)
    return Scored(value, ids, parts, logits, positions)


def _token_relevance(x, g, rows=1 << 14):
    """(x * g).sum(-1) in float32 (zeros where g is None), `rows` positions at a time: no float32 copy of a whole
    (B, N, hidden) input and its gradient (16 GiB each at 1M tokens of an 8B model), the same numbers."""
    if g is None:
        return torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    x2, g2 = x.detach().reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    out = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    for i in range(0, x2.shape[0], rows):
        out[i:i + rows] = (x2[i:i + rows].float() * g2[i:i + rows].float()).sum(-1)
    return out.reshape(x.shape[:-1])


def _image_fields(relevance, maps, counts, placeholders):
    """image_relevance, image_rows, image_share, text_share (module docstring) from the token relevance (B, N), the
    patch maps (one (h, w) per image), each image's number of placeholders (None: all the same, as in LLaVA) and the
    image placeholder positions (B, N). The image features fill the placeholders in row-major order: image k goes to
    the row holding its first one."""
    per_row = placeholders.sum(-1)
    n_images = len(maps)
    total = int(per_row.sum())
    if counts is None:
        if n_images == 0 or total % n_images:
            raise ValueError(f"{total} image placeholder tokens cannot hold the features of {n_images} images evenly")
        counts = [total // n_images] * n_images
    elif sum(counts) != total:
        raise ValueError(f"{total} image placeholder tokens, but the images' grids make {sum(counts)} features")
    starts = torch.tensor([0] + counts[:-1], device=per_row.device).cumsum(0)
    rows = torch.repeat_interleave(torch.arange(len(per_row), device=per_row.device), per_row)[starts]
    device = maps[0].device
    s_img = torch.zeros(len(per_row), device=device).index_add(0, rows.to(device), torch.stack([m.sum() for m in maps]))
    s_txt = relevance.masked_fill(placeholders, 0).sum(-1)
    denominator = s_img + s_txt
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    nonzero = denominator != 0
    return dict(image_relevance=list(maps), image_rows=rows,
                image_share=torch.where(nonzero, s_img / safe, 0.0), text_share=torch.where(nonzero, s_txt / safe, 0.0))
