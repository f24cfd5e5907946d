"""The test suite's own rules: no test module imports another test module.

A test module imported elsewhere runs its module-level code twice under pytest and ties
one file's tests to another's helpers; shared helpers live in a conftest.py or in a
helper module under tests/ whose name does not start with `test_`.
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
