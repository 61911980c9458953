"""attnlrp-fast: AttnLRP explanations of transformers with fused Triton flash-attention kernels.

The core: attention (bindings/attention.py), lrp (lrp_patch.py), explain (explanation.py), low_memory (memory.py),
estimate_memory (estimate.py: the memory of one explanation, on meta tensors), load_model (loading.py: SmolLM2
offline, or any causal LM), the model maps (models/), the rules index (rules.py) and the float64 oracles
(reference.py). The long-document application lives in attnlrp_fast.app, the evaluation in attnlrp_fast.evaluation.

Importing the package is light (no torch): each public name is imported on first use (PEP 562), so that
`attnlrp-fast --help` answers at once. attn_implementation="attnlrp_fast" is still registered with transformers
by `import attnlrp_fast`: at once when transformers' modeling code is already imported, else right after it is.
"""

import importlib as _importlib
import importlib.abc as _importlib_abc
import sys as _sys

__version__ = "0.1.0"

# public name -> (module, attribute), imported on first access
_PUBLIC = {
    "attention": (".bindings.attention", "attention"),
    "segment_ids_from_cu_seqlens": (".bindings.attention", "segment_ids_from_cu_seqlens"),
    "context_parallel": (".context_parallel", "context_parallel"),
    "ContextParallelError": (".context_parallel", "ContextParallelError"),
    "MemoryEstimate": (".estimate", "MemoryEstimate"),
    "estimate_memory": (".estimate", "estimate_memory"),
    "Explanation": (".explanation", "Explanation"),
    "explain": (".explanation", "explain"),
    "RULES": (".kernels.rules", "RULES"),
    "load_model": (".loading", "load_model"),
    "LRPHandle": (".lrp_patch", "LRPHandle"),
    "lrp": (".lrp_patch", "lrp"),
    "LowMemoryHandle": (".memory", "LowMemoryHandle"),
    "low_memory": (".memory", "low_memory"),
    "UnsupportedModelError": (".models", "UnsupportedModelError"),
    "FamilyMap": (".models", "FamilyMap"),
    "GLUSpec": (".models", "GLUSpec"),
    "MLPSpec": (".models", "MLPSpec"),
    "NormSpec": (".models", "NormSpec"),
    "RMSNormSpec": (".models", "RMSNormSpec"),
    "Contrast": (".targets", "Contrast"),
    "contrast": (".targets", "contrast"),
    "Neuron": (".targets", "Neuron"),
    "neuron": (".targets", "neuron"),
    "intervene": (".neurons", "intervene"),
    "InterventionHandle": (".neurons", "InterventionHandle"),
    "Edit": (".neurons", "Edit"),
    "set_to": (".neurons", "set_to"),
    "scale": (".neurons", "scale"),
    "add": (".neurons", "add"),
    "neuron_vocabulary": (".neurons", "neuron_vocabulary"),
    "NeuronVocabulary": (".neurons", "NeuronVocabulary"),
    "top_activating": (".neurons", "top_activating"),
    "ActivatingWindow": (".neurons", "ActivatingWindow"),
}

__all__ = ["attention", "lrp", "explain", "load_model", "contrast", "Contrast", "Explanation", "LRPHandle",
           "UnsupportedModelError", "RULES", "low_memory", "LowMemoryHandle", "estimate_memory", "MemoryEstimate",
           "segment_ids_from_cu_seqlens", "FamilyMap", "GLUSpec", "MLPSpec", "NormSpec", "RMSNormSpec",
           "context_parallel", "ContextParallelError", "neuron", "Neuron", "intervene", "InterventionHandle", "Edit",
           "set_to", "scale", "add", "neuron_vocabulary", "NeuronVocabulary", "top_activating", "ActivatingWindow",
           "__version__"]

_TRANSFORMERS_MODULE = "transformers.modeling_utils"   # holds AttentionInterface; imports masking_utils


def _register_with_transformers():
    """attn_implementation="attnlrp_fast" for any HF model whose attention goes through AttentionInterface;
    True when registered (stored as HF_REGISTERED)."""
    from .bindings.hf import register

    registered = register()
    globals()["HF_REGISTERED"] = registered
    return registered


class _RegisterAfterTransformers(_importlib_abc.MetaPathFinder):
    """Finds nothing itself: when transformers' modeling code is imported, it lets the other finders find it and
    registers the engine's attention right after that module has run, then takes itself off sys.meta_path."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRANSFORMERS_MODULE:
            return None
        for finder in _sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if self in _sys.meta_path:
                _sys.meta_path.remove(self)
            _register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


class _InstalledKernelsFirst(_importlib_abc.MetaPathFinder):
    """transformers (5.25 on) imports the hub's `kernels` package whenever it is installed. Run from a checkout's root
    (`python -m ...`: the root on sys.path) that name finds this repository's kernels/ folder instead (mapped into
    the package as attnlrp_fast.kernels), and every model import fails. While that is so and the distribution is
    installed, this finder answers `kernels` (and its submodules, by the package's own path) from where the
    distribution lives."""

    def __init__(self, location):
        self.location = location

    def find_spec(self, fullname, path, target=None):
        if fullname != "kernels":
            return None
        from importlib.machinery import PathFinder

        return PathFinder.find_spec(fullname, [self.location], target)


def _installed_kernels_first():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "kernels" in _sys.modules or not os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        return None                      # already imported, or an installed copy (no kernels/ folder beside it)
    if not any(os.path.abspath(p or os.curdir) == root for p in _sys.path):
        return None
    from importlib import metadata

    try:
        location = str(metadata.distribution("kernels").locate_file(""))
    except metadata.PackageNotFoundError:
        return None
    if os.path.abspath(location) == root or any(isinstance(f, _InstalledKernelsFirst) for f in _sys.meta_path):
        return None
    finder = _InstalledKernelsFirst(location)
    _sys.meta_path.insert(0, finder)
    return finder


_installed_kernels_first()

if _TRANSFORMERS_MODULE in _sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _RegisterAfterTransformers())


def _subpackages():
    """The package's subpackages (kernels/ and python_bindings/ are mapped in as kernels and bindings)."""
    import pkgutil

    return {m.name for m in pkgutil.iter_modules(__path__) if m.ispkg} | {"bindings", "kernels"}


def __getattr__(name):
    if name == "HF_REGISTERED":   # transformers not imported yet: register now (imports it)
        return _register_with_transformers()
    if name in _PUBLIC:
        module, attribute = _PUBLIC[name]
        value = getattr(_importlib.import_module(module, __name__), attribute)
    elif name in _subpackages():
        value = _importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    """The public API only: __all__, HF_REGISTERED and the subpackages."""
    return sorted({*__all__, "HF_REGISTERED", *_subpackages()})
