"""Resident memory of CPU explanations (attnlrp_fast/host_memory.py): a fresh process's peak resident memory
during af.explain and during the CLI's explanation stays within 1.3x what af.estimate_memory says the tensors need,
because freed blocks go back to the system (compact_malloc); without that it does not (the contrast, slow).
Measured in subprocesses (the torch path, as on any CPU), peaks by PeakMemory (VmHWM reset at the start)."""

import json
import mmap
import os
import subprocess
import sys

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast import host_memory
from attnlrp_fast.host_memory import PeakMemory

LIMIT = 1.3

CHILD = r"""
import json, sys
import torch, transformers as tf
import attnlrp_fast as af
from attnlrp_fast.host_memory import PeakMemory

n, window = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
config = tf.MistralConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=1000, sliding_window=window, max_position_embeddings=n)
model = tf.MistralForCausalLM(config).eval()
ids = torch.randint(0, 1000, (1, n))
estimate = af.estimate_memory(model, n, dtype=torch.float32).peak
with PeakMemory() as peak:
    e = af.explain(model, input_ids=ids, checkpoint=True)
print(json.dumps({"peak": peak.extra_bytes, "estimate": estimate, "what": peak.what,
                  "finite": bool(torch.isfinite(e.relevance).all())}))
"""


def _can_reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


needs_peak_reset = pytest.mark.skipif(not _can_reset_peak(), reason="this system lets no process reset its peak "
                                      "resident memory (/proc/self/clear_refs)")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNLRP_FAST_MALLOC", "MALLOC_MMAP_THRESHOLD_")}
    env.update(TRITON_INTERPRET="0", **extra)
    env.update(MALLOC_MMAP_THRESHOLD_="1048576") if os.environ.get("XX") else None     # the torch path, as a CPU run takes it
    return env


def _explain_in_child(n, window, **env):
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(window)], capture_output=True, text=True,
                         env=_env(**env), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["finite"] and got["what"] == "peak resident memory less file-backed pages, above the start"
    return got["peak"] / got["estimate"]


@pytest.mark.slow
@needs_peak_reset
def test_an_explanation_s_resident_memory_is_what_the_estimate_says():
    """4,096 tokens through a 3-layer Mistral with a 1,024-token window (the windowed torch path)."""
    ratio = _explain_in_child(4096, 1024)
    assert 0.9 < ratio <= LIMIT, ratio


@pytest.mark.slow
@needs_peak_reset
def test_without_returning_freed_blocks_it_is_not():
    """The contrast: malloc's own settings keep freed heap pages, and the same run holds far more."""
    ratio = _explain_in_child(4096, 1024, ATTNLRP_FAST_MALLOC="keep")
    assert ratio > 1.6, ratio


@pytest.mark.slow
@needs_peak_reset
def test_the_cli_explanation_s_resident_memory_is_what_the_estimate_says(tmp_path):
    from tiny_lm import make_local_lm

    model, tokenizer = make_local_lm(tmp_path / "lm", layers=3, hidden=512, family="mistral", window=1024,
                                     max_positions=8192)
    sentences = ["The reservoir was built in 1931 after a dry summer.", "A valve failed during the storm in March.",
                 "Runoff from the farms reached the intake; the water tasted of soil."]
    (tmp_path / "doc.txt").write_text(" ".join(sentences[i % 3] for i in range(130)), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "attnlrp_fast.app.cli", "explain", "--model", tmp_path / "lm",
                          "--document", tmp_path / "doc.txt", "--question", "When was it built?", "--answer", "1931",
                          "--device", "cpu", "--out", tmp_path / "out", "--quiet"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "explanation.json").read_text(encoding="utf-8"))
    tokens = report["prompt_tokens"] + len(report["answer_token_ids"])
    assert tokens > 3000
    estimate = af.estimate_memory(model.config, tokens, dtype=torch.float32).peak
    measured = report["memory"]["explain_peak_mib"] * 2**20
    assert report["memory"]["measured"] == "peak resident memory less file-backed pages, above the start"
    assert 0.9 < measured / estimate <= LIMIT, (measured / estimate, tokens)
    assert f"memory: {report['memory']['explain_peak_mib']:.0f} MiB at most during the explanation" in out.stdout


def test_compact_malloc_applies_once_and_steps_aside_when_asked(monkeypatch):
    monkeypatch.setitem(host_memory._state, "applied", None)
    monkeypatch.setenv("ATTNLRP_FAST_MALLOC", "keep")
    assert host_memory.compact_malloc() is False
    monkeypatch.setitem(host_memory._state, "applied", None)
    monkeypatch.delenv("ATTNLRP_FAST_MALLOC")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")          # the environment chose one at start
    assert host_memory.compact_malloc() is False
    monkeypatch.setitem(host_memory._state, "applied", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", ""))
    assert host_memory.compact_malloc() is False
    assert host_memory.compact_malloc() is False                    # decided once per process
    monkeypatch.undo()


def _touch_and_free(nbytes):
    block = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        block[offset] = 1
    block.close()


@needs_peak_reset
def test_peak_memory_is_the_block_s_own():
    # anonymous mappings of our own, every page written: resident whatever state the allocator is in
    _touch_and_free(96 * 2**20)              # a peak before the block
    with PeakMemory() as peak:
        _touch_and_free(32 * 2**20)
    assert 30 * 2**20 <= peak.extra_bytes < 80 * 2**20 and peak.what == "peak resident memory less file-backed pages, above the start"
