"""The package's shape: imports point one way (no cycle, even through imports inside functions;
nothing outside jaxgpt.cli imports jaxgpt.cli), and every module says what it owns (a docstring)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "jaxgpt"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The jaxgpt module an imported name lives in (the name itself, or its nearest package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every jaxgpt module `module` imports, at any depth (functions, conditionals, __main__)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from jaxgpt import engine` imports the submodule jaxgpt.engine, when it is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {m for m in map(resolve, targets) if m and m != module}
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_is_read_right():
    """The walker sees top-level, function-level and `from jaxgpt import x` imports."""
    assert "jaxgpt.decode.engine" in GRAPH["jaxgpt.formats.load"]  # from jaxgpt.decode.engine import generate
    assert "jaxgpt.formats.checkpoint" in GRAPH["jaxgpt.formats.load"]  # from jaxgpt.formats import checkpoint
    assert "jaxgpt.formats.load" in GRAPH["jaxgpt.cli.sample"]  # inside a function
    assert "jaxgpt.cli.sample" in GRAPH["jaxgpt.sample"]  # under `if __name__ == "__main__"`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# `python -m jaxgpt.<name>`: a module that only runs its command (docstring + main guard)
ENTRY = {m for m, p in MODULES.items() if m.count(".") == 1 and f"jaxgpt.cli.{m.split('.')[1]}" in MODULES
         and p.name != "__init__.py"}


def test_nothing_outside_cli_imports_cli():
    for m, deps in sorted(GRAPH.items()):
        if m == "jaxgpt.cli" or m.startswith("jaxgpt.cli.") or m in ENTRY:
            continue
        bad = sorted(d for d in deps if d == "jaxgpt.cli" or d.startswith("jaxgpt.cli."))
        assert not bad, f"{m} imports {bad}: only jaxgpt.cli may (library modules run their CLI via runpy)"


def test_entry_modules_only_run_their_command():
    """`python -m jaxgpt.<x>` works for every command: jaxgpt/<x>.py is a docstring and a main
    guard calling jaxgpt.cli.<x>.main, nothing else, and nothing imports it."""
    assert {"jaxgpt.train", "jaxgpt.sample", "jaxgpt.chat", "jaxgpt.eval", "jaxgpt.convert",
            "jaxgpt.quantize", "jaxgpt.prepare", "jaxgpt.sft"} <= ENTRY
    for m in ENTRY:
        tree = ast.parse(MODULES[m].read_text(encoding="utf-8"))
        body = tree.body[1:] if ast.get_docstring(tree) else tree.body
        assert len(body) == 1 and isinstance(body[0], ast.If), m
        assert "__main__" in ast.unparse(body[0].test), m
        assert GRAPH[m] == {f"jaxgpt.cli.{m.split('.')[1]}"}, m
        assert not any(m in deps for deps in GRAPH.values()), m


def test_every_module_has_a_docstring():
    missing = [m for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not missing, f"modules without a docstring: {missing}"
