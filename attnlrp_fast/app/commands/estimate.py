"""`attnlrp-fast estimate`: the memory one explanation needs, per mode and length, for any model, from its config
alone (attnlrp_fast.estimate), and with --gpu-memory the longest document that fits. Each table is printed as
it is done, with a progress bar meanwhile.

    attnlrp-fast estimate --model llama-3.1-8b --tokens 8k,32k,128k,1m --gpu-memory 80GiB
"""

import re
from dataclasses import dataclass
from functools import partial

import torch

from attnlrp_fast import estimate as est
from attnlrp_fast.app.common import LineBar, UsageError, bar_factory

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40}
MLP_CHUNKS = (256, 1024)   # the --mlp-chunk settings tried for the longest document in low_memory mode


def parse_tokens(text):
    """"8k,32k,128k,1m" -> [8192, 32768, 131072, 1048576] (k = 1024, m = 1024 * 1024); ValueError on nonsense."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", part)
        if not m or int(m.group(1)) == 0:
            raise ValueError(f"--tokens {text!r}: each length is a positive number, optionally with k or m "
                             "(8k = 8192), separated by commas")
        out.append(int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()])
    return out


def parse_bytes(text):
    """"80GiB" / "80GB" / "141 GiB" -> bytes (GB = 10^9, GiB = 2^30); ValueError on nonsense."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--gpu-memory {text!r}: a size such as 80GiB, 141GiB or 80GB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def size(n):
    """Bytes for people: GiB from 1 GiB on, MiB below."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _tokens(n):
    return f"{n // 2**20}m" if n % 2**20 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


@dataclass
class Longest:
    mode: str
    tokens: int               # 0: not even the shortest length fits
    mlp_chunk: int = None
    estimate: object = None


def longest(config, budget, dtype, mode, mlp_chunk, tick=None, offload=None, seq_chunk=None, gpus=1):
    """The longest input each mode fits in `budget` bytes (low_memory: the best of MLP_CHUNKS and --mlp-chunk);
    tick() after each estimate. offload: low_memory's checkpoints in host memory (the GPU budget only). gpus: per
    GPU under context parallelism."""
    chunks = sorted({mlp_chunk, *MLP_CHUNKS}) if mode == "low_memory" else [mlp_chunk]
    best = Longest(mode, 0)
    for chunk in chunks:
        n, e = est.longest_fitting(config, budget, dtype=dtype, mode=mode, mlp_chunk=chunk, start=4096,
                                   precision=1 / 32, progress=tick, offload=_offload(mode, offload),
                                   seq_chunk=_offload(mode, seq_chunk), gpus=_gpus(mode, gpus))
        if n > best.tokens:
            best = Longest(mode, n, chunk if mode == "low_memory" else None, e)
    return best


def _offload(mode, setting):
    """--offload and --seq-chunk apply to low_memory, the mode with checkpoints."""
    return setting if mode == "low_memory" else None


def _gpus(mode, gpus):
    """--gpus applies to the engine's modes (low_memory, plain); the contrast modes run on one GPU."""
    return gpus if mode in ("low_memory", "plain") else 1


def _predicted(config, n, mode, seq_chunk, tflops, gpus=1):
    """' <seconds>' predicted from the FLOP count at `tflops` TFLOP/s per GPU, the work split evenly over `gpus`
    ('' without)."""
    if not tflops or mode not in ("low_memory", "plain"):
        return f" {'-':>10}" if tflops else ""
    seconds = est.explanation_flops(config, n, mode=mode, seq_chunk=seq_chunk) / (tflops * 1e12 * gpus)
    return f" {seconds:>9,.0f}s" if seconds >= 10 else f" {seconds:>9.1f}s"


def mode_lines(config, mode, tokens, dtype, mlp_chunk, tick=lambda: None, offload=None, seq_chunk=None,
               tflops=None, gpus=1):
    """The mode's table: weights, the explanation's peak, their total and where the peak is, per length (a blank line
    first; with --offload cpu, low_memory's host memory too; with --gpus K, per GPU, and the ring traffic per layer;
    with --tflops, a time predicted from the FLOP count); tick() after each length."""
    offload, seq_chunk, gpus = _offload(mode, offload), _offload(mode, seq_chunk), _gpus(mode, gpus)
    host = f" {'host':>12}" if offload else ""
    host += f" {'ring/layer':>12}" if gpus > 1 else ""
    host += f" {'predicted':>10}" if tflops else ""
    settings = (f"--mlp-chunk {mlp_chunk}" if mode == "low_memory" else "") + \
        (f", --offload {offload}" if offload else "") + (f", --seq-chunk {seq_chunk}" if seq_chunk else "")
    if gpus > 1:
        settings = (settings + ", " if settings else "") + f"--gpus {gpus}: per GPU"
    lines = ["", f"{mode}" + (f" ({settings})" if settings else ""),
             f"{'tokens':>8} {'weights':>12} {'explanation':>16} {'total':>16}{host}  peak at"]
    for n in tokens:
        try:
            e = est.estimate_memory(config, n, dtype=dtype, mode=mode, mlp_chunk=mlp_chunk, offload=offload,
                                    seq_chunk=seq_chunk, gpus=gpus)
        except ValueError as ex:   # a contrast mode that does not cover this family
            lines.append(f"{_tokens(n):>8}  {str(ex).splitlines()[0][:100]}")
            break
        finally:
            tick()
        host = (f" {size(e.host):>12}" if offload else "") + (f" {size(e.ring_bytes):>12}" if gpus > 1 else "") + \
            _predicted(config, n, mode, seq_chunk, tflops, gpus)
        lines.append(f"{_tokens(n):>8} {size(e.weights):>12} {size(e.peak):>16} {size(e.total):>16}{host}  {e.where}")
    return lines


def longest_lines(config, budget, dtype, modes, mlp_chunk, tick=None, offload=None, seq_chunk=None, gpus=1):
    on = f"each of {gpus} GPUs of {size(budget)}" if gpus > 1 else size(budget)
    lines = ["", f"The longest document that fits {on} with the weights:"]
    for mode in modes:
        try:
            found = longest(config, budget, dtype, mode, mlp_chunk, tick, offload, seq_chunk, gpus)
        except ValueError as ex:
            lines.append(f"  {mode:<11} {str(ex).splitlines()[0][:100]}")
            continue
        if found.tokens == 0:
            lines.append(f"  {mode:<11} does not fit even 4,096 tokens")
            continue
        setting = f" with --mlp-chunk {found.mlp_chunk}" if found.mlp_chunk else ""
        host = f", host {size(found.estimate.host)}" if _offload(mode, offload) else ""
        lines.append(f"  {mode:<11} {found.tokens:,} tokens{setting} ({size(found.estimate.total)}{host})")
    return lines


NO_BAR = partial(LineBar, disable=True)   # tables() without the CLI's bars: a bar that shows nothing


def tables(args, bar=NO_BAR):
    """The command, a table at a time as each is done: lists of lines (the title; a table per mode; with
    --gpu-memory the longest documents), each computed under bar(total=, desc=, unit=) (the CLI's progress bars).
    ValueError for bad input (run() makes it one line, exit 2), before the first table."""
    tokens = parse_tokens(args.tokens)
    budget = parse_bytes(args.gpu_memory) if args.gpu_memory else None
    if args.mlp_chunk < 0:
        raise ValueError(f"--mlp-chunk {args.mlp_chunk}: a number of tokens (0: no chunking)")
    if getattr(args, "tflops", None) is not None and args.tflops <= 0:
        raise ValueError(f"--tflops {args.tflops:g}: a positive throughput in TFLOP/s")
    if getattr(args, "seq_chunk", None) is not None and args.seq_chunk < 1:
        raise ValueError(f"--seq-chunk {args.seq_chunk}: a positive number of tokens")
    gpus = getattr(args, "gpus", 1)
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: a positive number of GPUs")
    if gpus > 1 and getattr(args, "seq_chunk", None) is not None:
        raise ValueError("--gpus and --seq-chunk cannot be combined (context parallelism shards the sequence "
                         "already)")
    if gpus > 1 and min(tokens) < 2 * gpus:
        raise ValueError(f"--tokens {_tokens(min(tokens))} cannot be sharded over {gpus} GPUs (two chunks per GPU)")
    config = est.load_config(args.model)
    dtype = getattr(torch, args.dtype)
    est.meta_model(config, dtype)   # the config builds a causal LM: else one line now
    yield [f"Memory of one explanation of {args.model} ({str(dtype).split('.')[-1]}), as on a GPU:"]
    for mode in args.modes:
        with bar(total=len(tokens), desc=f"estimating {mode}", unit="length") as b:
            lines = mode_lines(config, mode, tokens, dtype, args.mlp_chunk, b.update, getattr(args, "offload", None),
                               getattr(args, "seq_chunk", None), getattr(args, "tflops", None), gpus)
        if getattr(args, "tflops", None) and mode in ("low_memory", "plain"):
            lines.append(f"(predicted: the explanation's FLOP count (estimate.explanation_flops) at {args.tflops:g} "
                         "TFLOP/s" + (f" per GPU, split evenly over {gpus} GPUs, the ring's transfers not counted"
                                      if gpus > 1 else "") + ", not a measurement)")
        yield lines
    if budget:
        with bar(total=None, desc=f"the longest document that fits {size(budget)}", unit="estimate") as b:
            lines = longest_lines(config, budget, dtype, args.modes, args.mlp_chunk, b.update,
                                  getattr(args, "offload", None), getattr(args, "seq_chunk", None), gpus)
        yield lines


def all_lines(args):
    """The command's lines, all at once (tables() without progress bars)."""
    return [line for table in tables(args) for line in table]


def run(args):
    """Each table printed as it is done, a progress bar meanwhile; bad input is a UsageError before the first."""
    try:
        for lines in tables(args, bar_factory(False, lines=True)):
            print("\n".join(lines), flush=True)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    return 0
