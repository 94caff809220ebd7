"""The layout is behaviour too (DESIGN.md section 7): one room per role, no cycles, gateway and node
never import each other, shared modules and the protocol import no role, nothing but the CLI's
bench verb imports the benchmark, the gateway stays shallow (at most GATEWAY_FLOORS floors of
imports) and no module outgrows MAX_MODULE_LINES. Read from the real import graph (grimp,
import-linter's engine); TYPE_CHECKING imports count: they are design ties."""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

import zmqinfer

ROLES = ("gateway", "node", "model", "mdns", "cli", "bench")
PROTOCOL = "protocol"  # the ZeroMQ protocol: shared by gateway and nodes, like the modules below
SHARED = ("liveness", "config", "log", "clusterstatus", "local")
GATEWAY_FLOORS = 6  # a request's way through the gateway reads top to bottom in a few steps
MAX_MODULE_LINES = 400  # past this a module is doing two jobs: split it by role


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("zmqinfer", exclude_type_checking_imports=False)


def _imports(graph: grimp.ImportGraph, module: str) -> set[str]:
    return graph.find_modules_directly_imported_by(module)


def test_every_module_lives_in_a_room(graph: grimp.ImportGraph) -> None:
    top = {m.split(".")[1] for m in graph.modules if m.count(".") >= 1}
    rooms = set(ROLES) | set(SHARED) | {PROTOCOL, "__main__"}
    assert top <= rooms, top - rooms


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


def test_the_protocol_imports_no_role_and_no_shared_module(graph: grimp.ImportGraph) -> None:
    """Gateway and nodes speak it; it knows neither (nor config, nor logging)."""
    bad = [(m, n) for m in graph.find_descendants(f"zmqinfer.{PROTOCOL}") for n in _imports(graph, m)
           if n.split(".")[1] != PROTOCOL]
    assert not bad


def floors(graph: grimp.ImportGraph, package: str) -> dict[str, int]:
    """Each module of `package` on the floor above everything of `package` it imports (1: it
    imports none of them)."""
    inside = graph.find_descendants(package) | {package}
    memo: dict[str, int] = {}

    def floor(m: str) -> int:
        if m not in memo:
            memo[m] = 0  # a cycle (test_no_import_cycles fails it) must not recurse forever
            below = [floor(n) for n in _imports(graph, m) if n in inside and n != m]
            memo[m] = 1 + max(below, default=0)
        return memo[m]

    return {m: floor(m) for m in sorted(inside)}


def test_the_gateway_stays_shallow(graph: grimp.ImportGraph) -> None:
    top = max(floors(graph, "zmqinfer.gateway").items(), key=lambda kv: kv[1])
    assert top[1] <= GATEWAY_FLOORS, top


def test_no_module_outgrows_its_room() -> None:
    root = Path(zmqinfer.__file__).parent
    big = {str(p.relative_to(root)): n for p in root.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big


def test_only_the_bench_verb_imports_the_benchmark(graph: grimp.ImportGraph) -> None:
    bench = graph.find_descendants("zmqinfer.bench")
    importers = {m for b in bench for m in graph.find_modules_that_directly_import(b)} - bench
    assert importers <= {"zmqinfer.cli.main"}, importers


def test_the_checker_sees_a_cycle_and_a_cross_import() -> None:
    """The rules above can fail: the same checks on a graph with the faults added."""
    g = grimp.build_graph("zmqinfer", exclude_type_checking_imports=False)
    g.add_import(importer="zmqinfer.protocol.wire", imported="zmqinfer.gateway.ring")
    g.add_import(importer="zmqinfer.node.worker", imported="zmqinfer.gateway.scheduler")
    g.add_import(importer="zmqinfer.config", imported="zmqinfer.gateway.ring")
    with pytest.raises(AssertionError):
        test_no_import_cycles(g)
    with pytest.raises(AssertionError):
        test_gateway_and_node_never_import_each_other(g, "node", "gateway")
    with pytest.raises(AssertionError):
        test_shared_modules_import_no_role(g)
    with pytest.raises(AssertionError):
        test_the_protocol_imports_no_role_and_no_shared_module(g)


def test_the_floor_count_sees_a_deeper_gateway() -> None:
    """A chain of imports one floor longer than allowed fails the floor rule."""
    g = grimp.build_graph("zmqinfer", exclude_type_checking_imports=False)
    deepest = max(floors(g, "zmqinfer.gateway").items(), key=lambda kv: kv[1])[0]
    chain = [f"zmqinfer.gateway.fake{i}" for i in range(GATEWAY_FLOORS)]
    for m in chain:
        g.add_module(m)
    for a, b in zip(chain, chain[1:] + [deepest]):
        g.add_import(importer=a, imported=b)
    with pytest.raises(AssertionError):
        test_the_gateway_stays_shallow(g)
