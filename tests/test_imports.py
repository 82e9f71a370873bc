"""No import cycle among fem_jax's modules.

Walks every fem_jax module's source with `ast` and collects the fem_jax modules it imports,
at the top level and inside functions alike (a function-level import still ties the two
modules together; it only hides the cycle until the function runs). `from . import x` is an
edge to the submodule x where x is one, else to the package. Importing a submodule also
runs its parent package's __init__; that implicit edge is left out, or every package
re-exporting its submodules would count as a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "fem_jax"
ROOT = Path(__file__).resolve().parents[1] / PKG


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def imports_of(name: str, files: dict[str, Path]) -> set[str]:
    """The fem_jax modules that module `name` imports anywhere in its source."""
    tree = ast.parse(files[name].read_text(), str(files[name]))
    package = name if _is_package(name, files) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = []
            for a in node.names:
                sub = f"{mod}.{a.name}"
                targets.append(sub if sub in files else mod)
        else:
            continue
        for t in targets:
            # `import fem_jax.a.b` names fem_jax.a.b; keep the longest prefix that is a module
            while t and t not in files:
                t = t.rpartition(".")[0]
            if t and t != name and (t == PKG or t.startswith(PKG + ".")):
                out.add(t)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_a_function_level_cycle(tmp_path):
    """The walker itself: a cycle made only of function-level imports is found, and a
    package importing its own submodules is not one."""
    pkg = tmp_path / PKG
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def g():\n    from .. import a\n")
    (pkg / "c.py").write_text("import fem_jax.sub.b\n")
    files = _modules(pkg)
    graph = {m: imports_of(m, files) for m in files}
    assert graph[PKG] == {"fem_jax.a"} and graph["fem_jax.c"] == {"fem_jax.sub.b"}
    assert find_cycle(graph) == ["fem_jax.a", "fem_jax.sub.b", "fem_jax.a"]
    (pkg / "sub" / "b.py").write_text("def g():\n    from .. import sub\n")  # the package, not a cycle
    graph = {m: imports_of(m, _modules(pkg)) for m in files}
    assert find_cycle(graph) is None


def test_no_import_cycle_among_fem_jax_modules():
    files = _modules()
    assert "fem_jax.models.hf" in files and "fem_jax.loop" in files
    graph = {m: imports_of(m, files) for m in files}
    assert "fem_jax.models.transformer" in graph["fem_jax.models.hf"]  # the walker sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ----------------------------------------------------------------------------- one concept, one place

OBJECTIVE_NAMES = {"fem", "empg", "grpo"}
BACKEND_NAMES = {"jax", "vllm"}


def _string_comparisons(path: Path) -> set[str]:
    """String constants a module compares a value against (==, !=, in, not in, match/case)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def strings(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for e in node.elts:
                yield from strings(e)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                found.update(strings(side))
        elif isinstance(node, ast.MatchValue):
            found.update(strings(node.value))
    return found


def _offenders(names: set[str], allowed) -> dict[str, set[str]]:
    out = {}
    for mod, path in _modules().items():
        if allowed(mod):
            continue
        hit = _string_comparisons(path) & names
        if hit:
            out[mod] = hit
    return out


def test_only_objectives_compares_against_an_objectives_name():
    """The objective's spec is read, never its name (loop, mstep, config, ...)."""
    assert _offenders(OBJECTIVE_NAMES, lambda m: m == f"{PKG}.objectives") == {}


def test_only_rollout_compares_against_a_backends_name():
    assert _offenders(BACKEND_NAMES, lambda m: m == f"{PKG}.rollout" or m.startswith(f"{PKG}.rollout.")) == {}


def test_the_name_walk_finds_a_comparison(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f(c):\n    if c.objective == 'grpo' or c.backend in ('jax', 'x'):\n        return 1\n")
    assert _string_comparisons(f) >= {"grpo", "jax"}
