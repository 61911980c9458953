"""Which implementation runs, decided in one place: the backend of an op (Triton kernels or the torch path), and
the device and dtype a user's "auto" means.

  backend None / "auto": CUDA tensors -> Triton; CPU tensors -> the torch path, or Triton's interpreter when
                         TRITON_INTERPRET=1 was set before import; float64 -> the torch path (no float64 dot in
                         Triton). "triton" / "torch" force one side (an error says why "triton" cannot run).
  device "auto": CUDA when there is one, else CPU.
  dtype "auto": bfloat16 on CUDA (float16 where the GPU has no bf16), float32 on CPU.
"""

import torch

from ..kernels import interpreting

BACKENDS = ("auto", "triton", "torch")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_backend(backend):
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors on `device`: CUDA, or any device under TRITON_INTERPRET=1; and
    the meta device, where the launchers allocate what they would on a GPU and launch nothing (the memory estimate
    models a GPU run)."""
    return device.type in ("cuda", "meta") or interpreting()


def uses_triton(device: torch.device, dtype: torch.dtype, backend) -> bool:
    """Whether `backend` (None / "auto" | "triton" | "torch") means the Triton kernels for tensors on `device` of
    `dtype`."""
    if backend == "torch":
        return False
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError("backend='triton' does not take float64 tensors; use backend='torch' for float64")
        if not triton_runs_on(device):
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing attnlrp_fast (or use backend='torch' / move the tensors to CUDA)")
        return True
    return dtype != torch.float64 and triton_runs_on(device)


def pick(triton_fn, torch_fn, x, backend):
    """The Triton launcher or the torch-path function for tensors like x under `backend`, its tensor results made
    contiguous: the layout the custom ops' fake implementations promise to torch.compile, whichever path ran (the
    launchers allocate contiguous results; torch's fused CPU attention returns the layout of its inputs)."""
    fn = triton_fn if uses_triton(x.device, x.dtype, backend) else torch_fn

    def dense(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in out)
        return out.contiguous() if isinstance(out, torch.Tensor) else out
    return dense


def backend_for_many_passes(device: torch.device):
    """The backend for work of many forward/backward passes (generation, integrated gradients, evaluation): the
    kernels on CUDA, the torch path on CPU (Triton's interpreter is for checking the kernels, far too slow)."""
    return None if device.type == "cuda" else "torch"


def choose_device(name) -> torch.device:
    """"auto" | "cpu" | "cuda" -> a torch.device; ValueError naming the problem."""
    if name not in DEVICES:
        raise ValueError(f"device {name!r}: use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': no CUDA device is available here (use cpu or auto)")
    return torch.device(name)


def choose_dtype(name, device: torch.device) -> torch.dtype:
    """"auto" | "bfloat16" | "float16" | "float32" -> a torch.dtype for models on `device`."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)
