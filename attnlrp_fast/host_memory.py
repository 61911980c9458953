"""Resident memory of explanations on CPU: what the process holds is what the tensors hold.

glibc's malloc serves a block under its mmap threshold from its heap and keeps the pages when the block is freed,
to serve the next one; the threshold rises to the largest block freed so far (up to 32 MiB). An explanation frees
and allocates tensors of many sizes layer after layer, so the heap fragments and keeps pages no tensor uses: the
peak resident memory of a CPU explanation was 2.5-3.5x its live tensors (a 3-layer Mistral, hidden 512, 4k and 8k
tokens: 712 MiB above the model at 8k for 204 MiB of tensors at most). With a fixed threshold of MMAP_THRESHOLD
bytes every larger block comes from mmap and goes back to the system when freed, and the peak is the live
tensors' (1.02-1.05x on the same runs). The price is the page faults of fresh blocks: that run took 7.7 s in place
of 6.0 s. (A threshold of 4 MiB gave 1.2-1.25x, 16 MiB 1.7-1.8x; trimming the heap after each layer 2.2-2.7x.)

`compact_malloc()` sets that threshold once per process (af.explain calls it for CPU models). It is a process-wide
setting of the C allocator, harmless to correctness; it is left alone where the environment chose one already
(MALLOC_MMAP_THRESHOLD_, read by glibc at start) or asks for none (ATTNLRP_FAST_MALLOC=keep: faster, more memory),
and off glibc.

`PeakMemory` reads the peak memory of a piece of work: on CPU the peak of the process's anonymous memory (what its
allocations hold) above the start. Linux keeps the peak of all resident memory (VmHWM), which `PeakMemory` resets
at the start where a process may (/proc/self/clear_refs), so that the peak is the work's own and not one reached
before it (loading a model, for instance); resident memory also counts the pages of shared libraries and mapped
files, and a first explanation in a process pages in some 60-80 MiB of torch's and MKL's code (measured on the
3-layer Mistral above: file-backed pages 175 -> 251 MiB). Those are the libraries', loaded once, shared and
reclaimable, not the explanation's: the peak is taken as VmHWM less the file-backed pages resident at the end
(`files_bytes` says how much of them the work paged in). On CUDA torch's peak allocated memory.
"""

import ctypes
import os
import platform
import re
import resource

MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3          # mallopt's parameter number (malloc.h)
ENV = "ATTNLRP_FAST_MALLOC"     # "keep": leave malloc's settings alone

_state = {"applied": None}


def compact_malloc() -> bool:
    """Blocks of MMAP_THRESHOLD bytes and more from mmap, back to the system when freed (module docstring), once
    per process. Returns whether the setting is in force."""
    if _state["applied"] is not None:
        return _state["applied"]
    applied = False
    if os.environ.get(ENV, "").strip().lower() != "keep" and "MALLOC_MMAP_THRESHOLD_" not in os.environ \
            and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            applied = ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        except (OSError, AttributeError):
            applied = False
    _state["applied"] = applied
    return applied


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def resident_bytes():
    """The process's resident memory now (VmRSS), or None where /proc does not say."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


class PeakMemory:
    """The peak memory of a `with` block above what was held when it began (module docstring):

        with PeakMemory(device) as peak:
            ...
        peak.extra_bytes      # the most held above the start
        peak.what             # how it was measured, in words
        peak.files_bytes      # CPU: shared-library and file pages the block paged in (not in extra_bytes)

    On CPU the peak resident memory (VmHWM, reset at the start) less the file-backed pages resident at the end,
    above the anonymous memory at the start; where the peak cannot be reset, the excess over the highest point before
    the block (ru_maxrss), a lower bound. On CUDA torch's peak allocated memory on that device."""

    def __init__(self, device="cpu"):
        import torch

        self.device = torch.device(device)
        self.extra_bytes = self.what = None
        self.files_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.what = "torch's peak allocated memory above the start"
            return self
        self._anon = _status_kib("RssAnon")
        self._files = _status_kib("RssFile")
        self._exact = self._reset() and self._anon is not None and self._files is not None
        if self._exact:
            self.what = "peak resident memory less file-backed pages, above the start"
        else:
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.what = "peak resident memory above the process's earlier peak (a lower bound)"
        return self

    @staticmethod
    def _reset():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return _status_kib("VmHWM") is not None

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self.extra_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self.before)
            return False
        hwm, files = _status_kib("VmHWM"), _status_kib("RssFile")
        if self._exact and hwm is not None and files is not None:
            self.extra_bytes = max(0, (hwm - files - self._anon) * 1024)
            self.files_bytes = max(0, (files - self._files) * 1024)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.extra_bytes = max(0, peak - self.before)
        return False
