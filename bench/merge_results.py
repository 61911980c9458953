"""Add the rows of some methods from one `attnlrp-fast evaluate` results JSON to another, for methods too slow to run
beside the rest in one sitting (the paper's baselines on the needle task's long documents):

    python bench/merge_results.py bench/results/needle.json later.json --methods atman,smoothgrad \
        --note "atman and smoothgrad from a run of 2026-12-03"

Both runs must be of the same samples: the same perturbation settings and seed, the same tasks' sample counts, and
where both hold AttnLRP's rows, the same ABPC per sample (within --atol) and the same evidence ranks. The rows of
`--methods` are copied task by task (where the other run has them), the method lists and the baselines' settings
follow, and the note goes into the file's "notes", which bench/report.py prints above its table. Writes BASE in
place unless --out is given."""

import argparse
import json
import sys
from pathlib import Path

SAME = ("steps", "seed", "perturb", "ig_steps")
REFERENCE = "attnlrp[torch]"


class Mismatch(ValueError):
    """The two runs are not of the same samples."""


def merge(base, other, methods, note, atol=1e-4):
    """A new result: `base` with `other`'s rows of `methods` and `note` added."""
    for key in SAME:
        if base["settings"].get(key) != other["settings"].get(key):
            raise Mismatch(f"settings differ: {key} = {base['settings'].get(key)!r} here, "
                           f"{other['settings'].get(key)!r} in the other run")
    merged = json.loads(json.dumps(base))
    taken = 0
    for task, theirs in other["tasks"].items():
        ours = merged["tasks"].get(task)
        if ours is None:
            raise Mismatch(f"task {task} is not in the base run")
        if ours.get("samples") != theirs.get("samples"):
            raise Mismatch(f"{task}: {ours.get('samples')} samples here, {theirs.get('samples')} in the other run")
        a, b = ours["methods"].get(REFERENCE), theirs["methods"].get(REFERENCE)
        if a and b:
            if "abpc_per_row" in a and "abpc_per_row" in b:
                worst = max((abs(x - y) for x, y in zip(a["abpc_per_row"], b["abpc_per_row"])), default=0.0)
                if worst > atol:
                    raise Mismatch(f"{task}: AttnLRP's ABPC differs by {worst:.3g} in a sample: not the same samples")
            if a.get("ranks") is not None and b.get("ranks") is not None and a["ranks"] != b["ranks"]:
                raise Mismatch(f"{task}: AttnLRP's evidence ranks differ: not the same samples")
        for m in methods:
            if m in theirs["methods"]:
                ours["methods"][m] = theirs["methods"][m]
                taken += 1
        if "methods_run" in ours:
            ours["methods_run"] += [m for m in theirs.get("methods_run", []) if m in methods
                                    and m not in ours["methods_run"]]
        if "method_options" in theirs:
            ours["method_options"] = theirs["method_options"]
    if not taken:
        raise Mismatch(f"the other run has no rows of {', '.join(methods)}")
    merged["settings"]["methods"] += [m for m in other["settings"]["methods"] if m in methods
                                      and m not in merged["settings"]["methods"]]
    if other["settings"].get("method_options"):
        merged["settings"]["method_options"] = other["settings"]["method_options"]
    merged["notes"] = (merged.get("notes") or []) + [note]
    return merged


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the results JSON to add to")
    p.add_argument("other", help="the results JSON the rows come from")
    p.add_argument("--methods", required=True, help="comma-separated method names, as the JSONs name them")
    p.add_argument("--note", required=True, help="where the rows come from, for the table's readers")
    p.add_argument("--out", help="write here instead of BASE")
    p.add_argument("--atol", type=float, default=1e-4, help="AttnLRP's ABPC per sample may differ by this much")
    args = p.parse_args(argv)
    try:
        base, other = (json.loads(Path(f).read_text()) for f in (args.base, args.other))
        merged = merge(base, other, [m.strip() for m in args.methods.split(",") if m.strip()], args.note,
                       args.atol)
    except (OSError, ValueError, KeyError) as e:
        print(f"merge_results: {e}", file=sys.stderr)
        return 1
    Path(args.out or args.base).write_text(json.dumps(merged, indent=1))
    print(f"wrote {args.out or args.base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
