"""The static import graph of crh_kernels: no cycles, and every import goes down the layers.

Read with :mod:`ast` only (nothing is imported): every ``import`` / ``from … import`` of every
module, at module level and inside functions and classes alike, relative imports resolved; a
string constant that is exactly the dotted name of a crh_kernels submodule counts too (registries
that import by name, e.g. the backends'). An edge goes to the most specific module named:
``from .analysis import spectra`` is an edge to ``crh_kernels.analysis.spectra``, ``from
.analysis import eigh`` one to the package ``crh_kernels.analysis`` (its ``__init__``). A
package's ``__init__`` importing its own submodules is fine and is not an edge.

Data flows one way: collect (hooks) -> moments -> backends -> kernels, and
moments -> analysis -> report -> plots (report imports plots lazily; plots never imports report).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

PKG = "crh_kernels"
PKG_DIR = Path(__file__).resolve().parents[1] / PKG

# Layers, lowest first. A module may import modules of its own layer or of a lower one, never of
# a higher one. ``BASE`` modules hold no concept of their own (environment, build, version) and
# are importable by anyone; they import only each other. The root package (``crh_kernels``, its
# ``__init__``) is the public facade: the top layer.
BASE = ("_env", "_build", "_version")
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("kernels", ("kernels",)),                     # Triton kernels only
    ("backends", ("backends",)),                   # the backend protocol, registry, launchers
    ("moments", ("moments", "distributed")),       # the Moments state and its exact all-reduce
    ("analysis", ("analysis",)),                   # α, spectra, fits, phases: pure functions
    ("plots", ("plots",)),                         # figures of a report (duck-typed)
    ("report", ("report",)),                       # numbers of a collector, laid out
    ("collect", ("collect",)),                     # hooks -> Moments; Collector.report()
    ("integrations", ("integrations",)),           # trainer callbacks over Collector and Report
    ("selfcheck", ("selfcheck",)),                 # `crh check`
    ("experiments", ("experiments",)),             # the paper's experiments
    ("cli", ("cli", "__main__")),                  # `crh`
    ("api", ("",)),                                # crh_kernels/__init__.py: public names
)


# ----------------------------------------------------------------------------- the graph
def _modules() -> Dict[str, Path]:
    """``{dotted name: path}`` of every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PKG_DIR.rglob("*.py")):
        parts = list(path.relative_to(PKG_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PKG, *parts])] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _known(name: str, modules) -> Optional[str]:
    """The longest prefix of ``name`` that is a module of the package (None: outside it)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def _imports(mod: str, path: Path, modules) -> Set[str]:
    """The crh_kernels modules that ``mod`` imports (anywhere in its body)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    # the package a relative import starts from: a package's own name, else its parent
    here = mod.split(".") if _is_package(path) else mod.split(".")[:-1]
    targets: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    t = _known(alias.name, modules)
                    if t:
                        targets.add(t)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here[:len(here) - (node.level - 1)] if node.level > 1 else list(here)
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == PKG or base.startswith(PKG + ".")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                t = sub if sub in modules else _known(base, modules)
                if t:
                    targets.add(t)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith(PKG + ".") and node.value in modules):
            targets.add(node.value)  # imported by name (importlib.import_module(registry[...]))
    targets.discard(mod)
    if _is_package(path):  # a package's __init__ importing its own submodules is fine
        targets = {t for t in targets if not t.startswith(mod + ".")}
    return targets


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {mod: _imports(mod, path, modules) for mod, path in modules.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle path (``[a, b, …, a]``) per strongly connected component with a cycle."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    comps: List[List[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # Tarjan (the graph is small: recursion is fine)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    out = []
    for comp in comps:  # a shortest cycle through the component's first module (BFS)
        members, start = set(comp), comp[0]
        prev: Dict[str, str] = {}
        queue, seen, found = [start], {start}, None
        while queue and found is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & members):
                if w == start:
                    found = v
                    break
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    queue.append(w)
        path = [start]
        v = found
        while v is not None and v != start:
            path.append(v)
            v = prev.get(v)
        out.append([start] + path[1:][::-1] + [start])
    return out


def _layer(mod: str) -> Optional[int]:
    """Rank of ``mod`` in LAYERS (-1: BASE), None when no layer names it."""
    rel = mod[len(PKG) + 1:] if mod != PKG else ""
    top = rel.split(".")[0]
    if top in BASE:
        return -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        if top in prefixes:
            return rank
    return None


# ----------------------------------------------------------------------------- the tests
_SAMPLE = """
import crh_kernels.moments
import numpy
from crh_kernels.analysis import eigh
from . import sibling
from .. import report


def f():
    from ..analysis import spectra
    from .sibling import name


REGISTRY = {"torch": ("crh_kernels.backends.torch", "TorchBackend"), "key": "crh_kernels"}
"""
_SAMPLE_MODULES = {f"{PKG}{m}" for m in ("", ".moments", ".analysis", ".analysis.spectra", ".report",
                                        ".pkg", ".pkg.sibling", ".pkg.mod", ".backends",
                                        ".backends.torch")}


def test_the_reader_sees_every_kind_of_import(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(_SAMPLE)
    assert _imports(f"{PKG}.pkg.mod", path, _SAMPLE_MODULES) == {
        f"{PKG}.moments", f"{PKG}.analysis", f"{PKG}.pkg.sibling", f"{PKG}.report",
        f"{PKG}.analysis.spectra", f"{PKG}.backends.torch"}
    init = tmp_path / "__init__.py"  # the package itself (``.`` is pkg here too): its own
    init.write_text(_SAMPLE)         # submodules are not edges
    assert _imports(f"{PKG}.pkg", init, _SAMPLE_MODULES) == {
        f"{PKG}.moments", f"{PKG}.analysis", f"{PKG}.report", f"{PKG}.analysis.spectra",
        f"{PKG}.backends.torch"}


def test_a_cycle_is_reported_with_its_path():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}) == [
        ["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_is_read():
    g = import_graph()
    assert f"{PKG}.moments" in g and f"{PKG}.analysis.spectra" in g and len(g) > 20
    assert f"{PKG}.moments" in g[f"{PKG}.collect.collector"] or any(
        f"{PKG}.moments" in g[m] for m in g if m.startswith(f"{PKG}.collect"))


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles in crh_kernels:\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)


def test_every_module_has_a_layer():
    missing = [m for m in import_graph() if _layer(m) is None]
    where = Path(__file__).name
    assert not missing, f"modules in no layer (add them to LAYERS of {where}): {missing}"


def test_imports_go_down_the_layers():
    g = import_graph()
    names = ["base"] + [n for n, _ in LAYERS]
    bad = []
    for mod, targets in sorted(g.items()):
        lm = _layer(mod)
        if lm is None:
            continue
        for t in sorted(targets):
            lt = _layer(t)
            if lt is not None and lt > lm:  # BASE (-1) is below every layer: importable by anyone
                bad.append(f"  {mod} ({names[lm + 1]}) imports {t} ({names[lt + 1]})")
    order = " < ".join(names)
    assert not bad, f"imports that go up the layers ({order}):\n" + "\n".join(bad)
