"""`attnlrp-fast info`: versions, devices, the dispatch table and which backend `auto` picks here."""

import torch
import triton

import attnlrp_fast as af
from attnlrp_fast.bindings import dispatch, dispatch_table
from attnlrp_fast.kernels import interpreting


def _dispatch_table_line():
    path = dispatch_table.table_path()
    try:
        table = dispatch_table.load_table()
    except (OSError, ValueError) as e:
        return f"{path}: unusable ({e})"
    if table is None:
        return f"none ({path} does not exist: no GPU run has measured one; CUDA attention takes SDPA where it can)"
    gated = ", ".join(f"{k} ({v})" for k, v in table.get("gated_out", {}).items()) or "nothing"
    return (f"{path}: measured on {table['device']} (compute capability {table['capability']}) on "
            f"{table.get('date', '?')}; Triton forward {table['forward']}, dQ {table.get('dq', 'separate')}; "
            f"{len(table.get('cases', []))} cases; gated out: {gated}")


def run(args):
    print(f"attnlrp-fast {af.__version__}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print(f"Triton interpreter (TRITON_INTERPRET): {'on' if interpreting() else 'off'}")
    for dev in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        path = "triton" if dispatch.uses_triton(torch.device(dev), torch.float32, None) else "torch"
        print(f"backend=None on {dev} tensors -> {path} (norms, GLU products; attention per call, below)")
    print(f"dispatch table: {_dispatch_table_line()}")
    for dev in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        device = torch.device(dev)
        dtype = dispatch.choose_dtype("auto", device)
        print(f"attention on {dev} tensors ({str(dtype).removeprefix('torch.')}), backend=None:")
        for label, choice in dispatch.describe_attention(device, dtype):
            print(f"  {label:<44} -> {choice.engine}: {choice.reason}")
    return 0
