"""Where a --model name points, decided before anything waits on the network (from_pretrained_options):

  a file or folder that exists        -> loaded from there
  a model in the Hugging Face cache   -> loaded from the cache (offline when the hub is unreachable)
  a hub id, the hub reachable         -> looked up on the hub
  anything else                       -> ValueError at once: one line, with "did you mean ...?" when a name the
                                         command knows, a model folder here or a cached model is close

The hub is reachable when HF_HUB_OFFLINE is not set and its endpoint (HF_ENDPOINT, through the environment's
proxy) answers within REACH_SECONDS, asked once per process. Without this, a mistyped name waits through the hub
client's retries (half a minute) before it fails.
"""

import difflib
import functools
import os
import re
from pathlib import Path

REACH_SECONDS = 3.0
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")   # "name" or "owner/name"


def hub_unreachable():
    """Why the hub cannot be asked now (a phrase for an error message), or None when it can."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _no_answer(constants.ENDPOINT)


@functools.lru_cache(maxsize=None)
def _no_answer(endpoint):
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=REACH_SECONDS)   # any answer will do, an error status too
    except Exception as e:   # the client's connection and timeout errors (httpx or requests)
        return f"{endpoint} does not answer ({type(e).__name__})"
    return None


def cache_folder():
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_ids():
    """The model ids in the Hugging Face cache."""
    root = cache_folder()
    return sorted(p.name[len("models--"):].replace("--", "/") for p in root.glob("models--*")) if root.is_dir() else []


def is_cached(name):
    """Whether the cache holds the config of hub id `name`."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache_folder()), str)
    except Exception:   # not a valid repo id
        return False


def did_you_mean(name, known=()):
    """" (did you mean a or b?)" for the names close to `name` among `known`, the model folders in the current
    folder and the cached ids; "" when none is."""
    here = [p.name for p in Path.cwd().iterdir() if (p / "config.json").is_file()] if Path.cwd().is_dir() else []
    candidates = list(dict.fromkeys([*known, *here, *cached_ids()]))
    lower = {c.lower(): c for c in candidates}
    close = [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.5)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def from_pretrained_options(name, known=(), label=None):
    """Keyword arguments for from_pretrained(name): {} or, for a cached model while the hub is unreachable,
    {"local_files_only": True}. ValueError for a name that is none of the module docstring's cases, its message
    `label` (default "--model NAME") and why, with the rule and a "did you mean" (did_you_mean over `known`)."""
    label = label or f"--model {name}"
    if os.path.exists(name):
        return {}
    if not HUB_ID.fullmatch(name):
        raise ValueError(f"{label}: no such file or folder{did_you_mean(name, known)}")
    if is_cached(name):
        return {"local_files_only": True} if hub_unreachable() else {}
    why = hub_unreachable()
    if why:
        raise ValueError(f"{label}: no such file or folder, nor a model in the Hugging Face cache ({cache_folder()});"
                         f" a hub id is looked up only while the hub answers, and {why}{did_you_mean(name, known)}")
    return {}
