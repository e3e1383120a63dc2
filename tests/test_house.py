"""The house rules, read from the source: no import cycle between the project's modules, imports at
module level (inside a function only for heavy optional modules), dependencies one way
(scheduler imports nothing of ours but scheduler; runtime nothing of gateway or cli), and modules of
a readable size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "tools", "gateway", "runtime", "scheduler")
# imported inside functions on purpose: heavy, optional, or absent where the code does not need them
HEAVY = ("vllm", "torch", "transformers", "matplotlib", "ray", "pynvml", "tokenizers", "tqdm",
         "safetensors")
MAX_LINES = 400
# modules over MAX_LINES, each with the reason in its docstring (a line starting "Long:")
LONG_OK = {"runtime.config", "runtime.engines.engine", "runtime.executor.executor",
           "scheduler.simulator", "tools.profiler"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The project module an import names (a `from pkg import mod` may name a submodule)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(path: Path, mods: dict[str, Path]) -> tuple[set[str], list[tuple[int, str]]]:
    """(project modules imported at module level, (line, name) of imports inside functions)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    nested: list[tuple[int, str]] = []

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        return [f"{base}.{a.name}" for a in node.names] + [base]

    def visit(node: ast.AST, in_func: bool, in_type_check: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for n in names(child):
                    if in_func:
                        nested.append((child.lineno, n))
                    elif not in_type_check and (m := _resolve(n, mods)) is not None:
                        top.add(m)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, True, in_type_check)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, in_func, True)
            else:
                visit(child, in_func, in_type_check)

    visit(tree, False, False)
    return top, nested


def test_no_import_cycle() -> None:
    mods = modules()
    graph = {m: imports(p, mods)[0] - {m} for m, p in mods.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                dfs(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_imports_are_at_module_level_but_for_heavy_optional_ones() -> None:
    mods = modules()
    bad = []
    for m, p in mods.items():
        for line, name in imports(p, mods)[1]:
            root = name.split(".")[0]
            if root not in HEAVY and name not in ("", "."):
                bad.append(f"{p.relative_to(REPO)}:{line} {name}")
    assert not bad, "function-level imports of light modules:\n" + "\n".join(sorted(set(bad)))


def test_dependencies_point_one_way() -> None:
    mods = modules()
    rank = {"cli": 4, "tools": 3, "gateway": 2, "runtime": 1, "scheduler": 0}
    bad = []
    for m, p in mods.items():
        for n in imports(p, mods)[0]:
            a, b = m.split(".")[0], n.split(".")[0]
            # cli composes everything; tools may use the runtime and the scheduler
            if rank[b] > rank[a] and a != "cli":
                bad.append(f"{m} -> {n}")
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def test_modules_stay_readable() -> None:
    mods = modules()
    long = {m for m, p in mods.items() if len(p.read_text().splitlines()) > MAX_LINES}
    assert long <= LONG_OK, f"modules over {MAX_LINES} lines without a reason: {sorted(long - LONG_OK)}"
    unexplained = [m for m in long
                   if "\nLong: " not in (ast.get_docstring(ast.parse(mods[m].read_text())) or "")]
    assert not unexplained, f"no 'Long:' reason near the top of {unexplained}"


def test_the_engine_guard_imports_the_standard_library_only() -> None:
    """It leads every engine's process group and must start in milliseconds (its CPU time is also
    counted as a spare's import)."""
    code = ("import sys, runtime.engines.guard; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'scheduler', "
            "'aiohttp', 'gateway', 'orjson'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
