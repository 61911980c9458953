"""`attnlrp-fast make-model DIR`: a tiny random Llama with a BPE tokenizer and a chat template saved to a folder
(app/tiny.py), for trying the other commands with no download."""

from pathlib import Path

from attnlrp_fast.app import tiny
from attnlrp_fast.app.common import UsageError


def run(args):
    out = Path(args.folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"make-model {args.folder}: exists and is not an empty folder")
    for flag, value, low in (("--layers", args.layers, 1), ("--hidden", args.hidden, 16)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if args.hidden % 16:
        raise UsageError(f"--hidden must be a multiple of 16 (4 heads of at least 4 dims), got {args.hidden}")
    tiny.make_model(out, layers=args.layers, hidden=args.hidden)
    print(f"wrote a tiny random Llama ({args.layers} layers, hidden {args.hidden}) with a BPE tokenizer and a chat "
          f"template to {out}; its answers are noise (random weights). Try:\n"
          f"  attnlrp-fast explain --model {out} --question \"What caused the contamination?\"")
    return 0
