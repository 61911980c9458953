"""The layers and homes of the code: data flows one way (app -> evaluation, integrations -> core -> bindings ->
kernels), one name per module, the float64 oracle shares no code with the fast paths, and every fast path reads the
rules' numbers from one table."""

import ast
import re
import runpy
from pathlib import Path

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast import rules
from attnlrp_fast.kernels.rules import ATTENTION_FACTORS, RULES
from helpers import dense_reference, make_qkv

ROOT = Path(__file__).resolve().parents[2]
# layer -> the layers it may import: itself and those below. evaluation and integrations are siblings: neither
# imports the other. Nothing in the package imports bench/; bench/ and tests/ may import anything (not walked).
BELOW_APP = {"kernels", "bindings", "core"}
ALLOWED = {"kernels": {"kernels"}, "bindings": {"kernels", "bindings"}, "core": BELOW_APP,
           "integrations": BELOW_APP | {"integrations"}, "evaluation": BELOW_APP | {"evaluation"},
           "app": BELOW_APP | {"integrations", "evaluation", "app"}}
SOURCES = {"kernels": "attnlrp_fast.kernels", "python_bindings": "attnlrp_fast.bindings",
           "attnlrp_fast": "attnlrp_fast"}   # folder -> the package it is installed as
SUBLAYERS = ("kernels", "bindings", "integrations", "evaluation", "app")   # attnlrp_fast.<these>; the rest is core
MODULE_PATH = re.compile(r"attnlrp_fast(\.\w+)*|bench(\.\w+)*")
IMPORTERS = {"import_module", "__import__"}
OLD_ALIASES = ("cli", "demo", "evaluate", "faithfulness", "longdoc", "recall", "report")


def module_name(path):
    """The dotted name `path` (under the repository root) is installed as: kernels/ as attnlrp_fast.kernels,
    python_bindings/ as attnlrp_fast.bindings; a package's __init__.py as the package."""
    top, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = SOURCES[top].split(".") + rest
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name):
    """The layer of a dotted module name: None outside the package (bench is a layer of its own, above all)."""
    parts = name.split(".")
    if parts[0] == "bench":
        return "bench"
    if parts[0] != "attnlrp_fast":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in SUBLAYERS else "core"


def _absolute(name, level, package):
    """`from <level dots><name> import ...` in `package`, as an absolute name."""
    base = package.split(".")
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def imports(path, name=None):
    """(line, dotted name) of everything the file at `path` imports, wherever it stands (module level, inside
    functions): import / from-import statements, relative ones resolved against where the file is installed
    (`name`, by default module_name(path)); importlib.import_module / __import__ of a literal module name (relative
    with a literal or __name__ / __package__ package); and in a package's __init__.py, the relative module paths of
    its lazy attribute table."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):     # "from m import a" reaches m.a (a module or a name in m)
            module = _absolute(node.module, node.level, package) if node.level else node.module
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and (target := _literal(node.args[0])):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if callee in IMPORTERS and target.startswith("."):
                anchor = node.args[1] if len(node.args) > 1 else None
                base = _literal(anchor) or {"__name__": name, "__package__": package}.get(getattr(anchor, "id", None))
                if base:
                    level = len(target) - len(target.lstrip("."))
                    found.append((node.lineno, _absolute(target[level:], level, base)))
            elif callee in IMPORTERS and MODULE_PATH.fullmatch(target):
                found.append((node.lineno, target))
        elif path.name == "__init__.py" and (target := _literal(node)) and re.fullmatch(r"\.\w+(\.\w+)*", target):
            found.append((node.lineno, _absolute(target[1:], 1, package)))
    return sorted(found, key=lambda f: f[0])


def source_files():
    return sorted(p for top in SOURCES for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def upward_imports(paths):
    """'file:line imports name (layer may not import its layer)' for each import above or beside the file's layer."""
    found = []
    for path in paths:
        layer = layer_of(module_name(path))
        for line, target in imports(path):
            other = layer_of(target)
            if other is not None and other not in ALLOWED[layer]:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({layer} may not import {other})")
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_import_goes_up_or_across(layer):
    paths = [p for p in source_files() if layer_of(module_name(p)) == layer]
    assert paths
    upward = upward_imports(paths)
    assert not upward, f"imports above the {layer} layer:\n" + "\n".join(upward)


def test_every_source_file_is_in_a_layer():
    assert {layer_of(module_name(p)) for p in source_files()} == set(ALLOWED)


def test_the_import_walk_sees_every_kind_of_import(tmp_path):
    """Absolute, relative, inside functions, importlib / __import__ (relative too) and an __init__'s lazy table:
    each is seen; names outside the package are not counted."""
    bad = tmp_path / "__init__.py"
    bad.write_text("import os\nfrom attnlrp_fast import reference\nfrom ..explanation import explain\n"
                   "def f():\n    from .app import cli\n    import attnlrp_fast.evaluation.recall\n"
                   "    importlib.import_module('attnlrp_fast.integrations')\n    __import__('bench.e2e')\n"
                   "    importlib.import_module('..app.demo', __name__)\n"
                   "_PUBLIC = {'x': ('.app.report', 'summary')}\n")
    seen = imports(bad, "attnlrp_fast.bindings")
    assert [t for _, t in seen] == [
        "os", "attnlrp_fast.reference", "attnlrp_fast.explanation.explain", "attnlrp_fast.bindings.app.cli",
        "attnlrp_fast.evaluation.recall", "attnlrp_fast.integrations", "bench.e2e", "attnlrp_fast.app.demo",
        "attnlrp_fast.bindings.app.report"]
    assert [layer_of(t) for _, t in seen] == [None, "core", "core", "bindings", "evaluation", "integrations",
                                              "bench", "app", "bindings"]


def test_the_application_imports_with_statements_only():
    """No importlib.import_module or __import__ in app/: its imports, inside functions where startup time matters,
    are statements, which this walk and static tools read."""
    for path in source_files():
        if layer_of(module_name(path)) == "app":
            nodes = ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            names = {n.attr if isinstance(n, ast.Attribute) else n.id for n in nodes
                     if isinstance(n, (ast.Attribute, ast.Name))}
            assert not names & IMPORTERS, f"{path.relative_to(ROOT)} imports through {names & IMPORTERS}"


def test_an_upward_import_is_reported_with_its_file_and_line(tmp_path, monkeypatch):
    """A lazy import of the application from the core names the file, the line and the import."""
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "attnlrp_fast").mkdir()
    core = tmp_path / "attnlrp_fast" / "minilm.py"
    core.write_text("import torch\n\n\ndef load():\n    from attnlrp_fast.app.longdoc import InputError\n")
    assert upward_imports([core]) == [
        "attnlrp_fast/minilm.py:5 imports attnlrp_fast.app.longdoc.InputError (core may not import app)"]


def test_one_name_per_module(monkeypatch):
    """No module stands in for another (sys.modules entries set by hand): the old alias paths are gone, and every
    package of the tree is one that setup.py installs."""
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
                assert ast.unparse(node.value) != "sys.modules", f"{path.relative_to(ROOT)}:{node.lineno}"
    assert not [a for a in OLD_ALIASES if (ROOT / "attnlrp_fast" / f"{a}.py").exists()]
    setup = {}                                    # setup.py's arguments (it finds its packages, from its folder)
    monkeypatch.setattr("setuptools.setup", lambda **kw: setup.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    assert {module_name(p) for p in source_files() if p.name == "__init__.py"} == set(setup["packages"])


def test_the_oracle_shares_no_code_with_the_fast_paths():
    """reference.py imports nothing of the library, and neither the kernels nor the bindings import reference.py."""
    assert not [t for _, t in imports(ROOT / "attnlrp_fast" / "reference.py") if layer_of(t)]
    for path in source_files():
        if layer_of(module_name(path)) in ("kernels", "bindings"):
            names = [t for _, t in imports(path)]
            assert not [t for t in names if (t + ".").startswith("attnlrp_fast.reference.")], path


@pytest.mark.parametrize("rule", RULES)
def test_the_attention_factor_table_is_the_oracles(rule):
    """Each rule's gradients are the table's multiples of the exact ones, as the float64 oracle derives them from
    the rules by autograd (no softcap: there the attnlrp rule also changes tanh's derivative)."""
    g = torch.Generator().manual_seed(len(rule))
    q, k, v = make_qkv(1, 4, 2, 9, 13, 8, torch.float64, generator=g)
    do = torch.randn(1, 4, 9, 8, generator=g, dtype=torch.float64)
    _, *exact = dense_reference(q, k, v, do, causal=True, rule="grad")
    _, *ruled = dense_reference(q, k, v, do, causal=True, rule=rule)
    qk, vf = ATTENTION_FACTORS[rule]
    for got, want, factor in zip(ruled, exact, (qk, qk, vf)):
        torch.testing.assert_close(got, factor * want, rtol=1e-12, atol=1e-12)


def test_every_rule_has_one_indexed_home():
    names = [r.name for r in rules.INDEX]
    assert len(names) == len(set(names)) and all(r.source and r.modified_gradient and r.fast_path for r in rules.INDEX)
    assert af.RULES == RULES == rules.RULES
    homes = (ROOT, ROOT / "attnlrp_fast")
    for r in rules.INDEX:   # every file a rule names exists (bindings/ is python_bindings/ in the repository)
        for word in r.fast_path.replace(",", " ").split():
            if word.endswith(".py"):
                path = word.replace("bindings/", "python_bindings/", 1) if word.startswith("bindings/") else word
                assert any((home / path).exists() for home in homes), (r.name, word)
