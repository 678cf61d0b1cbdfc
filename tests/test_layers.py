"""Dependencies point one way: core <- eval <- experiments (STYLE.md "Layers and registries")."""

import ast

from tests.conftest import ROOT

ALLOWED = {"core": {"core"}, "eval": {"core", "eval"}}  # which of the project's packages each layer may import
PROJECT = {"core", "eval", "experiments"}


def imports(path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_no_import_against_the_layer_order():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {top}"
             for layer, allowed in ALLOWED.items() for path in sorted((ROOT / layer).rglob("*.py"))
             for line, top in imports(path) if top in PROJECT - allowed]
    assert not wrong, "imports against core <- eval <- experiments:\n" + "\n".join(wrong)


def test_the_checker_sees_function_level_imports(tmp_path):
    probe = tmp_path / "x.py"
    probe.write_text("def f():\n    from experiments.common import main\n    import eval.records\n")
    assert imports(probe) == [(2, "experiments"), (3, "eval")]
