"""The model inputs explain() and the evaluation take, checked once: each problem named, nothing computed first."""

import inspect

import torch


def model_device(model):
    """The device the model takes its inputs on: its input embeddings' (for a model accelerate dispatched or
    offloaded, the device its hook runs them on; the meta device only holds offloaded weights), else its first
    parameter's."""
    from attnlrp_fast.models.common import compute_dtype_device

    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if isinstance(embeddings, torch.nn.Module) and next(embeddings.parameters(), None) is not None:
        return compute_dtype_device(embeddings)[1]
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_inputs(model, input_ids, attention_mask, pixel_values):
    """(input_ids, attention_mask) as (B, N), each problem raised. Token models take input_ids, vision models
    (ViT) pixel_values, vision-language models (models/llava.py) input_ids with image placeholder tokens and,
    when there are any, the pixel_values of one image per block of them."""
    from attnlrp_fast.models import is_vision_language, vision_parts

    device = model_device(model)
    vlm = is_vision_language(model)
    if vlm and input_ids is None:
        raise ValueError(f"{type(model).__name__} is a vision-language model: pass input_ids (with its image "
                         "placeholder tokens) and pixel_values")
    if not vlm and (input_ids is None) == (pixel_values is None):
        raise ValueError("pass exactly one of input_ids (token models) or pixel_values (vision models)")
    if pixel_values is not None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError("pixel_values must be a (B, C, H, W) tensor")
        if pixel_values.device != device:
            raise ValueError(f"pixel_values is on {pixel_values.device} but the model is on {device}")
        if not vlm:
            return None, None
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (B, N) with N > 0, got {tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    # on the meta device (af.estimate_memory) there are shapes but no values to check
    if vocab is not None and not input_ids.is_meta and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise ValueError(f"input_ids holds ids outside the model's vocabulary [0, {vocab})")
    if attention_mask is not None:
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
        if not attention_mask.is_meta and not attention_mask.bool().any(-1).all():
            raise ValueError("attention_mask leaves a row with no real token")
    if vlm and not input_ids.is_meta:
        image_tokens = int((input_ids == vision_parts(model).image_token_id).sum())
        if image_tokens and pixel_values is None:
            raise ValueError(f"input_ids hold {image_tokens} image placeholder tokens but no pixel_values were given")
        if pixel_values is not None and not image_tokens:
            raise ValueError("pixel_values were given but input_ids hold no image placeholder token (the processor "
                             "puts them where the image goes)")
    return input_ids, attention_mask


def check_decoder_inputs(model, input_ids, decoder_input_ids, decoder_attention_mask):
    """(decoder_input_ids, decoder_attention_mask) as (B, M) for an encoder-decoder model, None for another model;
    each problem raised."""
    config = getattr(model, "config", None)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if not seq2seq:
        if decoder_input_ids is not None or decoder_attention_mask is not None:
            raise ValueError(f"{type(model).__name__} is not an encoder-decoder model: decoder_input_ids and "
                             "decoder_attention_mask are for models such as T5 and BART")
        return None
    if decoder_input_ids is None:
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model: pass decoder_input_ids (the decoder's "
                         "tokens, e.g. its start token followed by the answer) as well as input_ids")
    if not isinstance(decoder_input_ids, torch.Tensor) or decoder_input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("decoder_input_ids must be an integer tensor (B, M)")
    if decoder_input_ids.dim() == 1:
        decoder_input_ids = decoder_input_ids[None]
    device = model_device(model)
    if decoder_input_ids.dim() != 2 or decoder_input_ids.shape[1] == 0:
        raise ValueError(f"decoder_input_ids must have shape (B, M) with M > 0, got {tuple(decoder_input_ids.shape)}")
    if decoder_input_ids.device != device:
        raise ValueError(f"decoder_input_ids is on {decoder_input_ids.device} but the model is on {device}")
    rows = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else 1
    if decoder_input_ids.shape[0] != rows:
        raise ValueError(f"decoder_input_ids has {decoder_input_ids.shape[0]} rows, input_ids {rows}")
    if decoder_attention_mask is not None:
        if decoder_attention_mask.dim() == 1:
            decoder_attention_mask = decoder_attention_mask[None]
        if tuple(decoder_attention_mask.shape) != tuple(decoder_input_ids.shape):
            raise ValueError(f"decoder_attention_mask has shape {tuple(decoder_attention_mask.shape)}, "
                             f"decoder_input_ids {tuple(decoder_input_ids.shape)}")
    return decoder_input_ids, decoder_attention_mask


def forward_parameters(model):
    """Names of the keyword arguments the model's forward takes (empty when its signature is opaque)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
