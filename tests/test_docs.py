"""The README documents every setting the code reads, with its current default."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import params_doc  # noqa: E402
import settings_doc  # noqa: E402


def test_readme_settings_tables_are_current():
    readme = (ROOT / "README.md").read_text()
    assert settings_doc.readme_section(readme) == settings_doc.tables().strip(), (
        "README settings are stale: run `python scripts/settings_doc.py --write`"
    )


def test_readme_parameter_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert params_doc.readme_section(readme) == params_doc.table().strip(), (
        "README parameter table is stale: run `python scripts/params_doc.py --write`"
    )


def test_the_parameter_table_reads_the_contract():
    """Each row's type, bounds, default and flag are the field's, not restated by hand."""
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in params_doc.table().splitlines()]
    rows = {row[0].strip(" `"): [cell.strip() for cell in row[1:]] for row in cells[2:]}
    assert rows["num_inference_steps"][:3] == ["integer 1..1000", "`50`", "`--steps`"]
    methods = "`ddim` \\| `null_text` \\| `negative_prompt` \\| `edict` \\| `ddpm`"
    assert rows["method"][:3] == [methods, "`ddim`", "`--method`"]
    assert rows["eta"][:2] == ["number > 0, <= 1", "absent"]
    assert rows["refine_tolerance"][:2] == ["number > 0, <= 1", "`0.0001`"]
    assert rows["seed"][:2] == ["integer 0..2^63-1", "absent"]
    assert rows["prompt"][1] == "required" and rows["verify"][1] == "`false`"
    assert rows["webhook_url"][2] == ""  # a submission's option, not an engine flag


def test_every_inversion_variable_in_the_code_is_documented():
    readme = (ROOT / "README.md").read_text()
    used: set[str] = set()
    paths = [*ROOT.glob("*.py")]
    for folder in ("service", "worker", "client"):
        paths += ROOT.glob(f"{folder}/**/*.py")
    for path in paths:
        used |= set(re.findall(r"INVERSION_[A-Z0-9_]+", path.read_text()))
    from ddim_inversion_client.settings import ClientSettings
    from service.settings import GatewaySettings
    from worker.settings import WorkerSettings

    for cls in (GatewaySettings, WorkerSettings, ClientSettings):
        prefix = cls.model_config.get("env_prefix") or "INVERSION_"
        used |= {f"{prefix}{name.upper()}" for name in cls.model_fields}
    # A name ending in "_" is an env_prefix (INVERSION_CLIENT_), not a variable.
    missing = sorted(v for v in used if not v.endswith("_") and f"`{v}`" not in readme)
    assert not missing, f"undocumented settings: {missing}"


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```sh") + 1 : lines.index("```sh") + 3]
    assert block[0].startswith("make serve") and block[1].startswith("make test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
