"""The test suite's own rules: no test module imports another test module, and no wait's
guard is a bare figure.

A test module imported elsewhere runs its module-level code twice under pytest and ties
one file's tests to another's helpers; shared helpers live in a conftest.py or in a
helper module under tests/ whose name does not start with `test_`.

A wait for an event or a process ends at the event; its guard, reached only when
something is broken, is one of conftest's named guards (EVENT_GUARD_S, STOP_GUARD_S),
derived there from the bounds the processes state, never a figure tuned to one machine.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(dotted: str) -> bool:
    return dotted.rsplit(".", 1)[-1].startswith("test_")


def imported_test_modules(path: Path) -> list[str]:
    """The test modules `path` imports, by the name it imports them under."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if _is_test_module(module):
                found.append(module)
            # `from tests.e2e import test_service`: a test module imported by name.
            found += [
                f"{module}.{alias.name}" for alias in node.names if _is_test_module(alias.name)
            ]
    return found


def test_no_test_module_imports_another():
    offenders = {
        str(path.relative_to(TESTS.parent)): imported
        for path in sorted(TESTS.rglob("test_*.py"))
        if (imported := imported_test_modules(path))
    }
    assert offenders == {}, "move what they share to a conftest.py or a helper module"


def test_the_check_sees_every_form_of_import(tmp_path: Path):
    module = tmp_path / "test_sample.py"
    module.write_text(
        "import tests.e2e.test_service\n"
        "from tests.service.test_gateway_jobs import assert_problem\n"
        "from .test_gateway_submit import post\n"
        "from tests.e2e import test_faults\n"
        "from tests.conftest import wait_for\n"
        "from tests.service.helpers import assert_problem as check\n"
    )
    assert imported_test_modules(module) == [
        "tests.e2e.test_service",
        "tests.service.test_gateway_jobs",
        ".test_gateway_submit",
        "tests.e2e.test_faults",
    ]


GUARDED_CALLS = {"wait_for": 1, "wait": 0, "join": 0}
"""Calls whose argument at that position is a wait's guard: conftest's `wait_for(predicate,
timeout, what)`, a process's `wait(timeout)`, a thread's `join(timeout)`."""


def bare_guards(path: Path) -> list[int]:
    """The lines of `path` where a guarded call's guard is a number literal."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
        position = GUARDED_CALLS.get(name or "")
        if position is None or len(node.args) <= position:
            continue
        guard = node.args[position]
        if isinstance(guard, ast.Constant) and isinstance(guard.value, (int, float)):
            lines.append(node.lineno)
    return lines


def test_no_wait_is_guarded_by_a_bare_figure():
    offenders = {
        str(path.relative_to(TESTS.parent)): found
        for path in sorted(TESTS.rglob("*.py"))
        if (found := bare_guards(path))
    }
    assert offenders == {}, "guard waits with conftest's EVENT_GUARD_S or STOP_GUARD_S"


def test_the_guard_check_sees_bare_figures(tmp_path: Path):
    module = tmp_path / "test_sample.py"
    module.write_text(
        "wait_for(ready, 10, 'it')\n"
        "process.wait(30)\n"
        "thread.join(5.0)\n"
        "wait_for(ready, EVENT_GUARD_S, 'it')\n"
        "process.wait(STOP_GUARD_S)\n"
        "asyncio.wait({task}, timeout=EVENT_GUARD_S)\n"
    )
    assert bare_guards(module) == [1, 2, 3]
