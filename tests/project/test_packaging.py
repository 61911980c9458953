"""Packaging that cannot drift: the wheel pip builds from this checkout, installed into a fresh virtual environment
that sees the dependencies but not the checkout, holds every module of the checkout (each importing from the
install) and every data file, and its `attnlrp-fast demo` runs. Not marked slow (slow tests stay out of CI): about
20 s on 2 idle cores (35-40 s on busy ones), most of it the demo and the imports, which run side by side."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"attnlrp_fast": "attnlrp_fast", "attnlrp_fast.kernels": "kernels",
           "attnlrp_fast.bindings": "python_bindings"}    # installed package -> folder of the checkout
BUILD_LEFTOVERS = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                         ".hypothesis", ".benchmarks")

IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys
import attnlrp_fast

found = {"attnlrp_fast": {"file": attnlrp_fast.__file__}}


def failed(name):
    found[name] = {"error": repr(sys.exc_info()[1])}


for m in pkgutil.walk_packages(attnlrp_fast.__path__, "attnlrp_fast.", onerror=failed):
    try:
        found[m.name] = {"file": importlib.import_module(m.name).__file__}
    except ModuleNotFoundError as e:
        found[m.name] = {"error": repr(e), "missing": e.name}
    except Exception as e:
        found[m.name] = {"error": repr(e)}
print(json.dumps(found))
"""


def run(cmd, **kw):
    """subprocess.run with text output, a timeout, and the output in the message when it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def source_modules():
    """Every module of the checkout, by the name it is installed as."""
    names = set()
    for package, folder in SOURCES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            names.add(".".join((package,) + (parts[:-1] if parts[-1] == "__init__" else parts)))
    return names


def dependency_paths():
    """This interpreter's import paths outside the checkout: where the fresh environment finds the dependencies.
    Listed in a .pth file, so .pth files in them (the editable install's finder among them) are not run."""
    paths = []
    for p in sys.path:
        q = Path(p or ".").resolve()
        if q.is_dir() and q != ROOT and ROOT not in q.parents and q != Path.cwd().resolve() and str(q) not in paths:
            paths.append(str(q))
    return paths


def installed_wheel(tmp):
    """Build the wheel from a copy of the checkout (no stale build/ in it), install it into a fresh venv without
    pip, then give that venv the dependencies; returns (wheel, python, site-packages, scripts folder)."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=BUILD_LEFTOVERS)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--disable-pip-version-check", "-w", tmp / "wheels", src])
    (wheel,) = (tmp / "wheels").glob("attnlrp_fast-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    query = "import json, sysconfig; print(json.dumps([sysconfig.get_path(k) for k in ('purelib', 'scripts')]))"
    where = json.loads(run([python, "-I", "-c", query]).stdout)
    # installed before the .pth below exists, so pip sees an empty environment (no editable attnlrp-fast to replace)
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
         "--disable-pip-version-check", wheel])
    site_packages = Path(where[0])
    (site_packages / "dependencies.pth").write_text("\n".join(dependency_paths()) + "\n", encoding="utf-8")
    return wheel, python, site_packages, Path(where[1])


@pytest.mark.slow
def test_the_wheel_installs_every_module_and_data_file_and_runs_the_demo(tmp_path):
    wheel, python, site_packages, scripts = installed_wheel(tmp_path)
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"attnlrp_fast"}    # never a top-level `kernels`
    installed = site_packages / "attnlrp_fast"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"HF_HUB_OFFLINE": "1"}
    out = tmp_path / "demo"
    with open(tmp_path / "demo.log", "w") as log:    # the demo and the imports side by side
        demo = subprocess.Popen([str(scripts / "attnlrp-fast"), "demo", "--out", str(out), "--quiet"], cwd=cwd,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            found = json.loads(run([python, "-I", "-c", IMPORT_EVERY_MODULE], cwd=cwd, env=env).stdout)
        finally:
            rc = demo.wait(timeout=600)

    def lacking_here(r):
        """A module that needs a library this environment lacks too (an optional one: inseq, captum)."""
        top = (r.get("missing") or "attnlrp_fast").split(".")[0]
        return top != "attnlrp_fast" and importlib.util.find_spec(top) is None

    missing_here = {n for n, r in found.items() if "error" in r and lacking_here(r)}
    broken = {n: r["error"] for n, r in found.items() if "error" in r and n not in missing_here}
    assert not broken, f"modules of the installed wheel that do not import: {broken}"
    elsewhere = {n: r["file"] for n, r in found.items()
                 if "file" in r and installed.resolve() not in Path(r["file"] or "/").resolve().parents}
    assert not elsewhere, f"imported from outside the install {installed}: {elsewhere}"
    assert set(found) == source_modules(), (f"in the checkout, not the wheel: {sorted(source_modules() - set(found))}; "
                                            f"in the wheel, not the checkout: {sorted(set(found) - source_modules())}")
    data = ROOT / "attnlrp_fast" / "data"
    files = [f.relative_to(data) for f in data.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    left_out = [str(f) for f in files if not (installed / "data" / f).is_file()]
    assert files and not left_out, f"data files the wheel leaves out: {left_out}"
    assert all((installed / "data" / f).read_bytes() == (data / f).read_bytes() for f in files)

    printed = (tmp_path / "demo.log").read_text()
    assert rc == 0, printed[-3000:]
    assert {"explanation.json", "explanation.html", "relevance.png"} <= {p.name for p in out.iterdir()}, printed
    assert json.loads((out / "explanation.json").read_text())["tokens"]


FAKE_KERNELS = {"kernels/__init__.py": "WHO = 'the installed distribution'\n",
                "kernels/layer.py": "from . import WHO\n",
                "kernels-0.0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.1\n",
                "kernels-0.0.1.dist-info/RECORD": ""}
WHICH_KERNELS = ("import attnlrp_fast, kernels, attnlrp_fast.kernels.rules as r; print(r.__file__); "
                 "print(kernels.__file__); import kernels.layer; print(kernels.layer.__file__)")


@pytest.mark.parametrize("installed", [True, False])
def test_the_checkout_s_kernels_folder_does_not_hide_an_installed_kernels_package(tmp_path, installed):
    """transformers (5.25 on) imports the hub's `kernels` distribution whenever it is installed; run from the
    checkout's root that name would find the repository's kernels/ folder. After `import attnlrp_fast` it is the
    installed distribution's (and its submodules); without one installed, nothing changes; attnlrp_fast.kernels is
    ours either way."""
    site = tmp_path / "site"
    for name, text in FAKE_KERNELS.items():
        if installed or not name.startswith("kernels-"):
            (site / name).parent.mkdir(parents=True, exist_ok=True)
            (site / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(site) if installed else ""}
    proc = subprocess.run([sys.executable, "-c", WHICH_KERNELS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    ours, *found = (Path(line) for line in proc.stdout.split())
    assert ours == ROOT / "kernels" / "rules.py"
    if installed:
        assert proc.returncode == 0, proc.stderr
        assert found == [site / "kernels" / "__init__.py", site / "kernels" / "layer.py"]
    else:                                # the folder, as Python finds it from here (it has no layer.py)
        assert found == [ROOT / "kernels" / "__init__.py"] and "No module named 'kernels.layer'" in proc.stderr
