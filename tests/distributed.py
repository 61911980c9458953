"""Running a function on K CPU processes joined in a gloo process group, for the context-parallel tests.

run_ranks(fn, world, *args, timeout=...) starts `world` fresh processes (spawn), each joins a gloo group (a file
store in a temporary folder, a timeout on every collective) and calls fn(rank, world, *args); what rank r returns
comes back as results[r] (through torch.save). A rank that raises fails the test with its traceback; one that is
still running after `timeout` seconds is killed and fails it too: no test hangs.
"""

import datetime
import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = 60.0


def _child(fn, rank, world, store_path, out_path, args, collective_timeout):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    result = None
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            result = ("ok", fn(rank, world, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:   # the parent reports it, with the traceback
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    torch.save(result, out_path)


def run_ranks(fn, world, *args, timeout=240.0, collective_timeout=COLLECTIVE_TIMEOUT, expect_errors=False):
    """[fn's result per rank]; with expect_errors=True, [("ok", result) | ("error", text) | ("killed", None)] per rank
    instead of failing on the first error."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        procs = [ctx.Process(target=_child, args=(fn, r, world, store, outs[r], args, collective_timeout))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        for p in procs:
            left = (deadline - datetime.datetime.now()).total_seconds()
            p.join(max(left, 0.1))
        results = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                results.append(("killed", None))
            elif os.path.exists(outs[r]):
                results.append(torch.load(outs[r], weights_only=False))
            else:
                results.append(("killed", None))
    if expect_errors:
        return results
    for r, (status, value) in enumerate(results):
        if status == "killed":
            raise AssertionError(f"rank {r} of {world} did not finish within {timeout} s (killed)")
        if status == "error":
            raise AssertionError(f"rank {r} of {world} failed:\n{value}")
    return [value for _, value in results]
