"""The package's two layers: library modules never import a job module, and no import cycle exists.

Job modules are the targets of `main.JOBS` (`fn(config, workdir)`); only `main` (which dispatches them, by name) and
the demo (which runs them in order) may import them. Imports inside functions count as much as module-level ones.
"""

import ast
from pathlib import Path

from qponder_jax import main

PACKAGE = Path(__file__).resolve().parents[1] / "qponder_jax"
MAY_IMPORT_JOBS = {"qponder_jax.main", "qponder_jax.demo"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """{module: the qponder_jax modules it imports anywhere in its body}. `from pkg import name` points at
    `pkg.name` when that is a module, else at `pkg`."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module_name(path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("qponder_jax"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                if not base.startswith("qponder_jax"):
                    continue
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
        graph[me] = {e for e in edges if e != me}
    return graph


def job_modules() -> set[str]:
    return {target.partition(":")[0] for target in main.JOBS.values() if isinstance(target, str)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_function_level_imports_and_the_jobs():
    graph = import_graph()
    assert "qponder_jax.train.grpo_job" in graph["qponder_jax.demo"]  # imported inside a function
    assert {"qponder_jax.eval", "qponder_jax.export", "qponder_jax.train.sft_job"} <= job_modules()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_module_imports_a_job_module():
    jobs = job_modules()
    offenders = {
        module: sorted(imported & jobs)
        for module, imported in import_graph().items()
        if module not in MAY_IMPORT_JOBS and imported & jobs
    }
    assert not offenders, f"library modules importing job modules: {offenders}"


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)
