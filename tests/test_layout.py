"""The package reads as the syllabus: the rules of its layout, read from the sources with ast.

* topic folders never import the course's glue (``distlab.course``), the panel and figures
  (``distlab.ui``) or the plotting and widget libraries, not even inside a function;
* no import cycles anywhere in the package;
* no module longer than about 350 lines.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distlab"
TOPICS = ("communication", "data_parallel", "asynchronous", "sharding", "model_parallel",
          "communication_efficient", "fault_tolerance", "problems", "heterogeneous",
          "planning", "decentralized", "memory", "precision", "profiling")
FORBIDDEN = ("distlab.course", "distlab.ui", "plotly", "ipywidgets", "anywidget")
MAX_LINES = 360   # "about 350": a docstring's last lines never force a split


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every module ``name`` imports (at the top or inside a function), absolute."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:   # `from distlab.x import y`: y may be a module itself
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return found


@pytest.mark.parametrize("name", [n for n in MODULES if n.split(".")[1:2] and
                                  n.split(".")[1] in TOPICS])
def test_topic_modules_never_import_the_course_the_ui_or_plotting(name):
    bad = sorted(i for i in imports(name) if i.startswith(FORBIDDEN))
    assert not bad, f"{name} imports {bad}; move that code to distlab/course/"


def test_the_package_has_no_import_cycles():
    graph = {n: {i for i in imports(n) if i in MODULES and i != n} for n in MODULES}
    state, cycles = {}, []

    def visit(n, path):
        state[n] = "open"
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                cycles.append(path[path.index(m):] + [m])
            elif m not in state:
                visit(m, path + [m])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_longer_than_about_350_lines(name):
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by responsibility"


def test_the_rules_see_a_forbidden_import_and_a_cycle(tmp_path, monkeypatch):
    # The checks above must be able to fail: a fake topic module importing plotly in a
    # function, and two modules importing each other.
    fake = tmp_path / "distlab"
    (fake / "sharding").mkdir(parents=True)
    (fake / "sharding" / "bad.py").write_text("def f():\n    import plotly\n")
    (fake / "a.py").write_text("from distlab import b\n")
    (fake / "b.py").write_text("from distlab.a import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    mods = {module_name(p): p for p in fake.rglob("*.py")}
    monkeypatch.setattr(__import__(__name__), "MODULES", mods)
    assert "plotly" in imports("distlab.sharding.bad")
    with pytest.raises(AssertionError, match="distlab.a -> distlab.b -> distlab.a"):
        test_the_package_has_no_import_cycles()
