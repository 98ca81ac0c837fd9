"""The tree shows the architecture and stays that way: no import cycles between the
package's modules, modules small enough to read whole, and comments that cite sources a
reader of this repository can follow."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "controller" / "viommu"
MAX_PYTHON_LINES = 450
MAX_CYTHON_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """viommu modules imported when the module is imported (module level, outside
    `if TYPE_CHECKING:`); `from pkg import mod` counts as importing pkg.mod."""
    found: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If) and not _is_type_checking(node):
            body += node.body + node.orelse
        elif isinstance(node, ast.Try):
            body += node.body
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("viommu")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("viommu"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): runtime_imports(ast.parse(p.read_text()), modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package's __init__ importing its own submodules is how packages work.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 50  # the parser sees the imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_python_modules_stay_small() -> None:
    large = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
             if (n := len(p.read_text().splitlines())) > MAX_PYTHON_LINES}
    assert not large, f"split these by concern (at most {MAX_PYTHON_LINES} lines): {large}"


def test_cython_sources_stay_small() -> None:
    sources = [p for p in (ROOT / "ext").rglob("*") if p.suffix in (".pyx", ".pxi", ".pxd")]
    assert sources
    large = {str(p.relative_to(ROOT)): n for p in sources
             if (n := len(p.read_text().splitlines())) > MAX_CYTHON_LINES}
    assert not large, f"split these by concern (at most {MAX_CYTHON_LINES} lines): {large}"


# Private notes of the project's authors are not in this repository; code cites the virtio
# spec, the Arm and PCIe specifications, Linux and QEMU files, mailing-list threads.
PRIVATE_REFERENCES = re.compile(r"digest §|§[A-G]\.\d|\bseed \d{3}\b|\bR21\b|design\.md")


def test_comments_cite_only_public_sources() -> None:
    offenders = []
    for top in ("controller", "ext", "tests", "benchmarks", "scripts", "guest-images",
                "qemu-configs"):
        for path in (ROOT / top).rglob("*"):
            if ".egg-info" in str(path) or "__pycache__" in path.parts:
                continue
            if path.is_file() and path.suffix in (".py", ".pyx", ".pxi", ".pxd", ".h", ".c",
                                                  ".toml", ".md", "") and path != Path(__file__):
                try:
                    text = path.read_text()
                except (UnicodeDecodeError, OSError):
                    continue
                offenders += [f"{path.relative_to(ROOT)}:{n}" for n, line in
                              enumerate(text.splitlines(), 1) if PRIVATE_REFERENCES.search(line)]
    assert not offenders, offenders
