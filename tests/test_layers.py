"""The layers and homes of the code: data flows one way (attnlrp_fast -> bindings -> kernels), the float64 oracle
shares no code with the fast paths, and every fast path reads the rules' numbers from one table."""

import ast
from pathlib import Path

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast import rules
from attnlrp_fast.kernels.rules import ATTENTION_FACTORS, RULES
from helpers import dense_reference, make_qkv

ROOT = Path(__file__).resolve().parent.parent
# package -> the packages (of attnlrp_fast) it may import: nothing above itself
ALLOWED = {"kernels": {"kernels"}, "python_bindings": {"kernels", "bindings"}}
INSTALLED = {"kernels": "kernels", "python_bindings": "bindings"}


def _imports(path, package):
    """(line, the attnlrp_fast subpackage or module it reaches) for every import in `path`, relative ones resolved
    against where the file is installed (attnlrp_fast.<package>)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):   # "from m import a" reaches m.a (a module or a name in m)
            module = node.module or ""
            if node.level:   # from . / .. : resolve against attnlrp_fast.<package>
                base = ["attnlrp_fast", INSTALLED[package]][:max(0, 2 - (node.level - 1))]
                module = ".".join(base + ([node.module] if node.module else []))
            names = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "attnlrp_fast":
                found.append((node.lineno, parts[1] if len(parts) > 1 else ""))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_upward_imports(package):
    upward = [f"{path.relative_to(ROOT)}:{line} imports attnlrp_fast.{target}"
              for path in sorted((ROOT / package).glob("*.py")) for line, target in _imports(path, package)
              if target not in ALLOWED[package]]
    assert not upward, "imports above their layer:\n" + "\n".join(upward)


def test_the_import_walk_sees_an_upward_import(tmp_path):
    """The walk itself: an import of attnlrp_fast.reference from the bindings, absolute or relative, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from attnlrp_fast import reference\nfrom ..explanation import explain\nfrom . import torch_path\n")
    assert [t for _, t in _imports(bad, "python_bindings")] == ["reference", "explanation", "bindings"]


def test_the_oracle_shares_no_code_with_the_fast_paths():
    """reference.py imports nothing of the library, and no fast path imports reference.py."""
    assert _imports(ROOT / "attnlrp_fast" / "reference.py", "python_bindings") == []
    for package in ALLOWED:
        for path in (ROOT / package).glob("*.py"):
            assert "reference" not in {t for _, t in _imports(path, package)}, path


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
