"""The package's shape: no import cycle among elsa's modules (every import counted, also those inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "elsa"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The elsa modules ``path`` imports (``from elsa.x import y`` is elsa.x.y when that is a module, else elsa.x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_imports_it_should():
    """The walker itself: module-level, function-level and relative imports are edges."""
    graph = import_graph()
    assert "elsa.sparsity.patterns" in graph["elsa.run.recipe"]          # module level
    assert "elsa.report.tables" in graph["elsa.run.sweep"]               # inside on_multirun_end
    assert "elsa.methods.base" in graph["elsa.methods.wanda"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_elsa():
    found = cycles(import_graph())
    assert found == [], f"import cycles among elsa's modules: {found}"


def test_report_and_sweep_no_longer_import_each_other():
    graph = import_graph()
    assert "elsa.run.sweep" not in graph["elsa.report.tables"]
    assert "elsa.run.recipe" not in graph["elsa.artifacts.generate"]
    assert {"elsa.report.results"} <= graph["elsa.report.tables"] & graph["elsa.run.sweep"] & graph["elsa.run.recipe"]


def test_the_slow_marker_says_what_it_marks():
    """pyproject's description of ``slow`` names what carries it: the long tail of the family grid and the plan's
    further measured runs."""
    import re
    import tomllib

    marker = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"][0]
    assert marker.startswith("slow: the long tail of tests/test_families.py's")
    marked = {p.name for p in (REPO / "tests").glob("test_*.py") if re.search(r"mark\.slow\b", p.read_text())}
    assert marked == {"test_families.py", "test_plan.py"}
    assert "test_plan.py's further measured runs" in marker


def test_the_solution_memo_belongs_to_the_sweep(tmp_path):
    """No class-level memo: a run stores its layer-wise solution only in the memo it is given (the sweep's, which
    SweepCallback opens when the sweep starts and drops when it ends); a single run has none."""
    from omegaconf import OmegaConf

    from conftest import TINY, compose
    from elsa.run.memo import SolutionMemo, for_this_sweep
    from elsa.run.recipe import run
    from elsa.run.sweep import SweepCallback

    assert not hasattr(SolutionMemo, "entry") and for_this_sweep() is None
    memo = SolutionMemo()
    run(compose([*TINY, "method=wanda", "save_model=false", "hardware.threads=1", f"output_dir={tmp_path / 'a'}"]),
        memo=memo)
    assert memo.entry is not None and memo.entry[3] == str(tmp_path / "a")

    callback = SweepCallback()
    callback.on_multirun_start(OmegaConf.create({}))
    assert for_this_sweep() is callback.memo and callback.memo.entry is None
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}))
    assert for_this_sweep() is None
