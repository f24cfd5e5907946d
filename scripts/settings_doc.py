"""Print the README's settings tables from the settings classes (the one source of truth)."""

from __future__ import annotations

from pydantic_settings import BaseSettings


def table(cls: type[BaseSettings]) -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        default = field.default
        shown = "" if default is None else str(default)
        if isinstance(default, tuple):
            shown = ",".join(default)
        rows.append(f"| `INVERSION_{name.upper()}` | `{shown}` | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    from service.settings import GatewaySettings
    from worker.settings import WorkerSettings

    print("### Gateway (`ddim-invert gateway`)\n")
    print(table(GatewaySettings))
    print("\n### Worker (`ddim-invert worker`, and `ddim-invert local`)\n")
    print(table(WorkerSettings))
