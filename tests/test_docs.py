"""The README documents every setting the code reads, with its current default."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import settings_doc  # noqa: E402


def test_readme_settings_tables_are_current():
    readme = (ROOT / "README.md").read_text()
    assert settings_doc.readme_section(readme) == settings_doc.tables().strip(), (
        "README settings are stale: run `python scripts/settings_doc.py --write`"
    )


def test_every_inversion_variable_in_the_code_is_documented():
    readme = (ROOT / "README.md").read_text()
    used: set[str] = set()
    for path in [*ROOT.glob("*.py"), *ROOT.glob("service/**/*.py"), *ROOT.glob("worker/**/*.py")]:
        used |= set(re.findall(r"INVERSION_[A-Z0-9_]+", path.read_text()))
    from service.settings import GatewaySettings
    from worker.settings import WorkerSettings

    for cls in (GatewaySettings, WorkerSettings):
        used |= {f"INVERSION_{name.upper()}" for name in cls.model_fields}
    missing = sorted(v for v in used if f"`{v}`" not in readme)
    assert not missing, f"undocumented settings: {missing}"


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```sh") + 1 : lines.index("```sh") + 3]
    assert block[0].startswith("make serve") and block[1].startswith("make test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
