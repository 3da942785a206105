"""
The shape of the house: no import cycles, and no crowded module without a reason.
(The dependency rules between packages are import-linter's contract; ``make lint``.)
"""

import os

import grimp

from .support import ROOT

#: A module longer than this says why at its top, in a line starting ``Long because:``.
MAX_LINES = 400


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (
                            child,
                            iter(sorted(graph.find_modules_directly_imported_by(child))),
                        )
                    )
                    break
                if child in on_stack:
                    low[module] = min(low[module], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == module:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    """The cycle finder reports a cycle when there is one (so the next test can fail)."""

    class Graph:
        modules = {"a", "b", "c"}
        edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}

        def find_modules_directly_imported_by(self, module):
            return self.edges[module]

    assert _cycles(Graph()) == [["a", "b"]]


def test_no_import_cycles():
    """No module of hero_compute imports, directly or not, a module that imports it."""
    graph = grimp.build_graph("hero_compute")
    assert _cycles(graph) == []


def test_no_crowded_module_without_a_reason():
    """Modules stay under MAX_LINES lines, or say at their top why they are longer."""
    crowded = []
    for directory, _, files in os.walk(os.path.join(ROOT, "hero_compute")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
            if len(lines) > MAX_LINES and not any(
                "Long because:" in line for line in lines[:30]
            ):
                crowded.append(f"{os.path.relpath(path, ROOT)} ({len(lines)} lines)")
    assert crowded == []
