"""Rules the test suite keeps: no fixed sleeps, and the fast tier never needs a broker.

A sleep followed by an assertion passes or fails with the machine's load; the tests wait
for the message or state they need instead (tests/integration/federation.py). And
``pytest -m "not integration"`` must run without mosquitto or real service processes.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# The polling loops: each waits for a condition with a deadline, sleeping between checks
# (unit/inprocess.py: the in-memory federation's helper, on the lead's branch).
POLLING_HELPERS = {("integration/federation.py", "wait_for"), ("unit/inprocess.py", "wait_for")}
# What only an integration test may use: a broker, a broker client, service processes.
BROKER_FIXTURES = {"broker", "mqtt_client", "small_broker", "secure"}
BROKER_IMPORTS = ("aggregator.ops.local_broker", "tests.integration")


def _modules() -> list[tuple[str, ast.Module]]:
    files = sorted(TESTS.rglob("*.py"))
    return [(str(f.relative_to(TESTS)), ast.parse(f.read_text())) for f in files]


class _SleepFinder(ast.NodeVisitor):
    """Collects (enclosing function, line) of every call of ``sleep``, ``time.sleep`` included."""

    def __init__(self) -> None:
        self.function = "<module>"
        self.found: list[tuple[str, int]] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        outer, self.function = self.function, node.name
        self.generic_visit(node)
        self.function = outer

    def visit_Call(self, node: ast.Call) -> None:
        callee = node.func
        name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", "")
        if name == "sleep":
            self.found.append((self.function, node.lineno))
        self.generic_visit(node)


def _sleeps(tree: ast.Module) -> list[tuple[str, int]]:
    finder = _SleepFinder()
    finder.visit(tree)
    return finder.found


def _marked_integration(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            return "integration" in ast.unparse(node.value)
    return False


def test_no_test_sleeps_outside_the_polling_helper() -> None:
    sleeps = [
        f"{path}:{line} in {func}()"
        for path, tree in _modules()
        for func, line in _sleeps(tree)
        if (path, func) not in POLLING_HELPERS
    ]

    assert sleeps == [], "wait for a condition (federation.wait_for / until) instead"


def test_every_integration_test_module_is_marked_integration() -> None:
    unmarked = [
        path
        for path, tree in _modules()
        if path.startswith("integration/test_") and not _marked_integration(tree)
    ]

    assert unmarked == []


def test_unit_tests_use_no_broker_and_no_service_processes() -> None:
    offenders = []
    for path, tree in _modules():
        if not path.startswith("unit/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                names = []
            offenders += [
                f"{path}:{node.lineno} imports {n}" for n in names if n.startswith(BROKER_IMPORTS)
            ]
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                used = {a.arg for a in node.args.args} & BROKER_FIXTURES
                offenders += [f"{path}:{node.lineno} uses fixture {f}" for f in sorted(used)]

    assert offenders == []
