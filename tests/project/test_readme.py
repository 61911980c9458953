"""Every fenced command and Python block of README.md that can run offline runs, as a user would run it: the bash
blocks each as one script (`bash -e`) in a fresh folder, the Python blocks in order in one process (later blocks
use what earlier ones defined), with the attnlrp-fast of this environment on PATH and no TRITON_INTERPRET. A block
that cannot run here says why in an HTML comment right above it: <!-- readme: skip (needs your own model) -->."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"(?:<!-- readme: skip \((?P<why>[^)]*)\) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)

pytestmark = pytest.mark.slow


def blocks(lang):
    """[(line, body, why it is skipped or None)] of README.md's fenced blocks in `lang`."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m["body"], m["why"]) for m in FENCE.finditer(text)
            if m["lang"] == lang]


def user_env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_every_block_is_run_or_says_why_not():
    for lang in ("bash", "python"):
        for line, body, why in blocks(lang):
            assert why is None or why.strip(), f"README.md:{line}: a skipped block must say why"
    assert len([b for b in blocks("bash") if b[2] is None]) >= 3 and len([b for b in blocks("python")
                                                                         if b[2] is None]) >= 3


@pytest.mark.parametrize("line,body", [(line, body) for line, body, why in blocks("bash") if why is None],
                         ids=lambda x: f"line{x}" if isinstance(x, int) else "")
def test_readme_commands_run(line, body, tmp_path):
    # the install command set up this environment and the test command is what runs this: neither is run again
    script = "\n".join(ln for ln in body.splitlines() if not ln.lstrip().startswith(("pip install", "python -m pytest")))
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=user_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"README.md:{line}:\n{script}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    if re.search(r"^attnlrp-fast explain(\s+#.*)?$", body, re.M):   # the main job: the answer the README quotes
        assert "answer (greedy): 'The treatment works are called the Millbrook Treatment Works.'" in proc.stdout


def test_readme_python_runs_in_order(tmp_path):
    runnable = [(line, body) for line, body, why in blocks("python") if why is None]
    program = "\n".join(f"# README.md:{line}\n{body}" for line, body in runnable)
    (tmp_path / "readme.py").write_text(program, encoding="utf-8")
    proc = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, env=user_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    # what the README says the first example prints
    assert "answer: v2" in proc.stdout and "  v2 +3.87" in proc.stdout and "  v9 +0.36" in proc.stdout
