"""The README documents every setting the code reads, with its current default."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import params_doc  # noqa: E402
import settings_doc  # noqa: E402

PACKAGES = ("service", "worker", "ddim_inversion", "ddim_inversion_client", "ddim_inversion_cli")
"""Every package of the project's own code."""

PROCESSES = {
    "GatewaySettings": (("service", "ddim_inversion_cli"), "service/settings.py"),
    "WorkerSettings": (("worker", "ddim_inversion_cli"), "worker/settings.py"),
    "ClientSettings": (
        ("ddim_inversion_client", "ddim_inversion_cli"),
        "ddim_inversion_client/settings.py",
    ),
}
"""Each settings class: the packages of the processes that read it, and its own module."""


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
    for folder in PACKAGES:
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


def settings_reads(packages: tuple[str, ...], own_module: str) -> set[str]:
    """The attributes read off an object named `*settings*` in `packages`' code, outside
    the settings module itself (a field its own validators alone read does nothing)."""
    read: set[str] = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / own_module:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)):
                    continue
                holder = node.value
                name = holder.id if isinstance(holder, ast.Name) else getattr(holder, "attr", "")
                if "settings" in name.lower():
                    read.add(node.attr)
    return read


def fields_behind(read: set[str], class_name: str, own_module: str) -> set[str]:
    """The fields that the settings class's own properties and methods named in `read`
    read off `self` (a derived value such as the served queue name reads its fields)."""
    tree = ast.parse((ROOT / own_module).read_text())
    (owner,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    methods = {n.name: n for n in owner.body if isinstance(n, ast.FunctionDef)}
    behind: set[str] = set()
    pending = [name for name in read if name in methods]
    while pending:
        for node in ast.walk(methods[pending.pop()]):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "self":
                if node.attr in methods and node.attr not in behind:
                    pending.append(node.attr)
                behind.add(node.attr)
    return behind


def test_every_documented_setting_is_read_by_its_process():
    """A setting in the README tables (generated from these classes) that its process
    never reads is a knob that does nothing: make it work or remove it."""
    from ddim_inversion_client.settings import ClientSettings
    from service.settings import GatewaySettings
    from worker.settings import WorkerSettings

    unread = {}
    for cls in (GatewaySettings, WorkerSettings, ClientSettings):
        packages, own_module = PROCESSES[cls.__name__]
        read = settings_reads(packages, own_module)
        read |= fields_behind(read, cls.__name__, own_module)
        unread[cls.__name__] = [name for name in cls.model_fields if name not in read]
    assert unread == {name: [] for name in PROCESSES}
