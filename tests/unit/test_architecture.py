"""The layout is behaviour too (DESIGN.md section 7): one room per role, no cycles, gateway and node
never import each other, shared modules import no role, and nothing but the CLI's bench verb
imports the benchmark. Read from the real import graph (grimp, import-linter's engine);
TYPE_CHECKING imports count: they are design ties."""

from __future__ import annotations

import grimp
import pytest

ROLES = ("gateway", "node", "model", "mdns", "cli", "bench")
SHARED = ("wire", "codec", "wirecheck", "limits", "inbox", "sockets", "liveness", "config", "log", "tensors",
          "clusterstatus", "local", "keys")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("zmqinfer", exclude_type_checking_imports=False)


def _imports(graph: grimp.ImportGraph, module: str) -> set[str]:
    return graph.find_modules_directly_imported_by(module)


def test_every_module_lives_in_a_room(graph: grimp.ImportGraph) -> None:
    top = {m.split(".")[1] for m in graph.modules if m.count(".") >= 1}
    assert top <= set(ROLES) | set(SHARED) | {"__main__"}, top - set(ROLES) - set(SHARED)


def test_no_import_cycles(graph: grimp.ImportGraph) -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(_imports(graph, m)):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph.modules):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


@pytest.mark.parametrize("a,b", [("gateway", "node"), ("node", "gateway")])
def test_gateway_and_node_never_import_each_other(graph: grimp.ImportGraph, a: str, b: str) -> None:
    bad = [(m, n) for m in graph.find_descendants(f"zmqinfer.{a}")
           for n in _imports(graph, m) if n.startswith(f"zmqinfer.{b}.")]
    assert not bad


def test_shared_modules_import_no_role(graph: grimp.ImportGraph) -> None:
    bad = [(f"zmqinfer.{m}", n) for m in SHARED for n in _imports(graph, f"zmqinfer.{m}")
           if n.split(".")[1] in ROLES]
    assert not bad


def test_only_the_bench_verb_imports_the_benchmark(graph: grimp.ImportGraph) -> None:
    bench = graph.find_descendants("zmqinfer.bench")
    importers = {m for b in bench for m in graph.find_modules_that_directly_import(b)} - bench
    assert importers <= {"zmqinfer.cli.main"}, importers


def test_the_checker_sees_a_cycle_and_a_cross_import() -> None:
    """The rules above can fail: the same checks on a graph with the faults added."""
    g = grimp.build_graph("zmqinfer", exclude_type_checking_imports=False)
    g.add_import(importer="zmqinfer.wire", imported="zmqinfer.gateway.ring")
    g.add_import(importer="zmqinfer.node.worker", imported="zmqinfer.gateway.scheduler")
    with pytest.raises(AssertionError):
        test_no_import_cycles(g)
    with pytest.raises(AssertionError):
        test_gateway_and_node_never_import_each_other(g, "node", "gateway")
    with pytest.raises(AssertionError):
        test_shared_modules_import_no_role(g)
