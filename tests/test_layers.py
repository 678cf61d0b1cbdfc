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


def test_eval_names_no_experiment():
    """eval renders what it is given (the experiments' table.yaml, read as data): no experiment's name is a string
    in its code (docstrings and comments aside), so adding or renaming an experiment never touches eval."""
    from experiments.registry import EXPERIMENTS

    named = []
    for path in sorted((ROOT / "eval").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        named += [f"{path.relative_to(ROOT)}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and id(n) not in docstrings and n.value in EXPERIMENTS]
    assert not named, "eval names experiments (declare it in the experiment's table.yaml instead):\n" + "\n".join(named)
