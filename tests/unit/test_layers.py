"""The import layers of the design, checked on the source: imports point downward, and no cycles.

Layers, bottom up (README.md "Layout", DESIGN): ``vmsh/errors.py``, ``vmsh/guest_memory.py``,
``vmsh/state_types.py`` and ``vmsh/thread_names.py``; ``vmsh/config`` (pure); ``vmsh/devices``
(register models); the machine (``vmsh/engine/*``); the control loop (``vmsh/engine/vmm.py``);
the front-ends (cli, launcher, repl, script, api, harness, remote, and the tools beside them:
config_cli, images, logsetup).
Every ``import`` counts, at module level, inside functions and under ``if TYPE_CHECKING:``; an
import made only for type checking is left out of the cycle check (it never runs) but not out of
the layer rules (it still couples the layers). Imports by name at run time (``importlib``) are not seen.

An import names the module it loads: ``from vmsh.engine import kvm`` is an edge to
``vmsh.engine.kvm``, ``from vmsh.engine.kvm import Kvm`` one to ``vmsh.engine.kvm``. The parent
packages Python initialises on the way are not edges of their own.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "vmsh"

FRONT_ENDS = ("vmsh.api", "vmsh.script", "vmsh.repl", "vmsh.cli", "vmsh.launcher", "vmsh.harness", "vmsh.remote",
              # the tools beside them: the config and images commands, the entry point, logging setup
              "vmsh.config_cli", "vmsh.images", "vmsh.__main__", "vmsh.logsetup")
CONTROL = "vmsh.engine.vmm"
#: the bottom layer: modules that import no other vmsh module
BOTTOM = ("vmsh.guest_memory", "vmsh.errors", "vmsh.state_types", "vmsh.thread_names", "vmsh.syscalls")


@dataclass(frozen=True)
class Source:
    """One module's text, and whether it is a package's ``__init__``."""

    text: str
    is_package: bool = False


@dataclass(frozen=True, order=True)
class Edge:
    """``importer`` imports ``imported`` at ``line``."""

    importer: str
    imported: str
    line: int
    #: True when the import sits under ``if TYPE_CHECKING:`` (it never runs)
    type_checking: bool = False

    def __str__(self) -> str:
        note = " (TYPE_CHECKING)" if self.type_checking else ""
        return f"{self.importer} -> {self.imported}, line {self.line}{note}"


# -- reading the tree ------------------------------------------------------------------------------


def load_sources(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Source]:
    """Every ``.py`` module of ``package`` by dotted name."""
    out: dict[str, Source] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = Source(path.read_text(encoding="utf-8"), is_package)
    return out


def extension_modules(root: Path = ROOT, package: str = PACKAGE) -> set[str]:
    """Compiled modules (cffi's ``_native``): importable, but with no source to read."""
    return {f"{package}.{p.name.split('.', 1)[0]}" for p in (root / package).glob("*.so")}


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest prefix of dotted ``name`` that is a known module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def _base_of(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str, source: Source, known: set[str]) -> list[Edge]:
    """The edges from ``module`` to the known modules it imports, wherever the import is."""
    edges: list[Edge] = []

    def add(target: str, line: int, type_checking: bool) -> None:
        resolved = _resolve(target, known)
        if resolved is not None and resolved != module:
            edges.append(Edge(module, resolved, line, type_checking))

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, type_checking)
        elif isinstance(node, ast.ImportFrom):
            base = _base_of(node, module, source.is_package)
            for alias in node.names:
                # ``from pkg import submodule`` loads the submodule; ``from mod import name`` mod
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in known else base, node.lineno, type_checking)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(ast.parse(source.text, filename=module), False)
    return edges


def import_graph(sources: Mapping[str, Source], extra_modules: Iterable[str] = ()) -> list[Edge]:
    """Every edge between the modules of ``sources`` (and to ``extra_modules``)."""
    known = set(sources) | set(extra_modules)
    return sorted({edge for name, src in sources.items() for edge in imports_of(name, src, known)})


# -- the rules -----------------------------------------------------------------------------------


def _within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def layer_violations(edges: Iterable[Edge]) -> list[str]:
    """Every edge that points up (or sideways out of a pure layer), with the rule it breaks."""
    out: list[str] = []
    for e in edges:
        src, dst = e.importer, e.imported
        if _within(src, "vmsh.config") and not _within(dst, "vmsh.config", "vmsh.errors"):
            out.append(f"config is pure (only vmsh.config and vmsh.errors): {e}")
        if _within(src, "vmsh.devices") and _within(dst, "vmsh.engine", "vmsh._native", *FRONT_ENDS):
            out.append(f"devices never import KVM, the engine or above: {e}")
        if src in BOTTOM:
            out.append(f"{src} is the bottom layer and imports no other vmsh module: {e}")
        if _within(src, "vmsh.engine") and _within(dst, *FRONT_ENDS):
            out.append(f"the engine never imports a front-end: {e}")
        elif _within(src, "vmsh.engine") and src != CONTROL and dst == CONTROL:
            out.append(f"the machine layer never imports the control loop: {e}")
    return out


def import_cycles(edges: Iterable[Edge]) -> list[list[Edge]]:
    """The import cycles (strongly connected components of more than one module), each as the
    run-time edges inside it; imports only made under ``TYPE_CHECKING`` are left out."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        if not e.type_checking:
            graph.setdefault(e.importer, []).append(e)
            graph.setdefault(e.imported, [])
    # Tarjan's algorithm, iterative (the graph is a few hundred modules, but recursion depth
    # follows the longest import chain).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, int]] = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            out_edges = graph[node]
            if i < len(out_edges):
                work.append((node, i + 1))
                nxt = out_edges[i].imported
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    cycles = []
    for component in components:
        if len(component) > 1:
            inner = sorted(e for m in component for e in graph[m] if e.imported in component)
            cycles.append(inner)
    return sorted(cycles)


def _report(title: str, lines: list[str]) -> str:
    return f"{len(lines)} {title}:\n  " + "\n  ".join(lines)


# -- the tree ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vmsh_edges() -> list[Edge]:
    return import_graph(load_sources(), extension_modules())


def test_the_checker_sees_the_tree(vmsh_edges: list[Edge]) -> None:
    """Guards the tests below against passing because nothing was read."""
    importers = {e.importer for e in vmsh_edges}
    assert {"vmsh.engine.vm", "vmsh.config", "vmsh.devices.virtio.queue"} <= importers
    assert Edge("vmsh.engine.pvm", "vmsh.engine.x86.decode", 0) in {
        Edge(e.importer, e.imported, 0) for e in vmsh_edges}


def test_imports_respect_the_layers(vmsh_edges: list[Edge]) -> None:
    violations = layer_violations(vmsh_edges)
    assert not violations, _report("imports against the layers", violations)


def test_no_import_cycles(vmsh_edges: list[Edge]) -> None:
    cycles = import_cycles(vmsh_edges)
    lines = [" | ".join(str(e) for e in cycle) for cycle in cycles]
    assert not cycles, _report("import cycles (each: the edges inside it)", lines)


# -- the checker itself on synthetic sources ---------------------------------------------------


def _graph(**modules: str) -> list[Edge]:
    """Sources by module name, with ``__`` for dots; a name ending in ``__init`` is a package."""
    sources = {}
    for key, text in modules.items():
        name = key.replace("__", ".")
        is_package = name.endswith(".init")
        sources[name.removesuffix(".init")] = Source(text, is_package)
    return import_graph(sources)


def test_checker_finds_a_cycle_through_a_function_level_import() -> None:
    edges = _graph(
        vmsh__engine__a="from vmsh.engine.b import thing\n",
        vmsh__engine__b="def f():\n    from vmsh.engine import a\n    return a\n",
        vmsh__engine__c="import vmsh.engine.a\n",
    )
    assert import_cycles(edges) == [[Edge("vmsh.engine.a", "vmsh.engine.b", 1),
                                     Edge("vmsh.engine.b", "vmsh.engine.a", 2)]]


def test_checker_finds_a_longer_cycle_and_ignores_type_checking_imports_for_cycles() -> None:
    edges = _graph(
        vmsh__script__x="from . import y\n",
        vmsh__script__y="from .z import k\n",
        vmsh__script__z="from vmsh.script.x import q\n",
        vmsh__engine__p="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vmsh.engine.q import Q\n",
        vmsh__engine__q="import vmsh.engine.p\n",
    )
    cycles = import_cycles(edges)
    assert [[str(e) for e in c] for c in cycles] == [[
        "vmsh.script.x -> vmsh.script.y, line 1",
        "vmsh.script.y -> vmsh.script.z, line 1",
        "vmsh.script.z -> vmsh.script.x, line 1",
    ]]


def test_checker_finds_layer_breaches_including_type_checking_and_relative_imports() -> None:
    edges = _graph(
        vmsh__errors="",
        vmsh__guest_memory="import vmsh.errors\n",
        vmsh__config__init="from . import model\n",
        vmsh__config__model="from vmsh.errors import ConfigError\nfrom ..devices import blk\n",
        vmsh__devices__init="",
        vmsh__devices__blk="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vmsh.engine.vm import Vm\n",
        vmsh__engine__init="",
        vmsh__engine__vm="def f():\n    from vmsh.engine.vmm import Event\n",
        vmsh__engine__vmm="from vmsh.repl import x\n",
        vmsh__repl="",
    )
    assert layer_violations(edges) == [
        "config is pure (only vmsh.config and vmsh.errors): vmsh.config.model -> vmsh.devices.blk, line 2",
        "devices never import KVM, the engine or above: vmsh.devices.blk -> vmsh.engine.vm, line 3 (TYPE_CHECKING)",
        "the machine layer never imports the control loop: vmsh.engine.vm -> vmsh.engine.vmm, line 2",
        "the engine never imports a front-end: vmsh.engine.vmm -> vmsh.repl, line 1",
        "vmsh.guest_memory is the bottom layer and imports no other vmsh module: "
        "vmsh.guest_memory -> vmsh.errors, line 1",
    ]


def test_checker_resolves_packages_submodules_and_names() -> None:
    edges = _graph(
        vmsh__init="",
        vmsh__engine__init="",
        vmsh__engine__acpi__init="from .builder import build\nfrom . import spec\n",
        vmsh__engine__acpi__builder="from ...errors import E\nfrom vmsh import errors\n",
        vmsh__engine__acpi__spec="",
        vmsh__engine__user="from vmsh.engine.acpi import build, spec\nimport vmsh.engine.acpi.spec as s\n",
        vmsh__errors="",
    )
    assert [str(e) for e in edges] == [
        "vmsh.engine.acpi -> vmsh.engine.acpi.builder, line 1",
        "vmsh.engine.acpi -> vmsh.engine.acpi.spec, line 2",
        "vmsh.engine.acpi.builder -> vmsh.errors, line 1",
        "vmsh.engine.acpi.builder -> vmsh.errors, line 2",
        "vmsh.engine.user -> vmsh.engine.acpi, line 1",
        "vmsh.engine.user -> vmsh.engine.acpi.spec, line 1",
        "vmsh.engine.user -> vmsh.engine.acpi.spec, line 2",
    ]
