"""The inversion parameters as command-line flags, generated from `InversionParams`.

Each field of the contract becomes one flag of `ddim-invert local` and `ddim-invert
submit`: `--kebab-case` of its name (a few keep the shorter names they always had), typed
from its annotation (choices from a Literal, an int or a float, a switch for a bool,
KEY=VALUE pairs for a mapping, text the contract parses for anything else), its help the
contract's description and default. A flag not given stays out of the parameters, so the
contract's own default applies: no default is restated here.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Literal

from pydantic.fields import FieldInfo

from ddim_inversion.params import NULL_TEXT_GUIDANCE_SCALE, InversionParams, outer_type

FLAG_NAMES: dict[str, str] = {
    "num_inference_steps": "--steps",
    "encode_mode": "--encode",
    "return_trajectory": "--trajectory",
}
"""The flags whose names are not their parameter's: kept, so that scripts keep working."""

EXTRA_HELP: dict[str, str] = {
    "guidance_scale": f"{NULL_TEXT_GUIDANCE_SCALE} with --method null_text",
    "model": "`local`: the model to load, a diffusers folder, a hub id or 'tiny' "
    "(default: INVERSION_MODEL)",
}
"""What the CLI adds to a parameter's meaning (see `parameters_from_args`)."""


def flag_of(name: str) -> str:
    """The flag of a parameter: `num_inference_steps` -> `--steps`, `seed` -> `--seed`."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _scheduler_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _kind(info: FieldInfo) -> dict[str, Any]:
    """argparse's type, action, choices, nargs and metavar for a field of the contract."""
    origin, args = outer_type(info)
    if origin is Literal:
        return {"choices": list(args)}
    if origin is bool:
        default = info.get_default(call_default_factory=True)
        return {"action": "store_true" if default is False else argparse.BooleanOptionalAction}
    if origin is int:
        return {"type": int, "metavar": "N"}
    if origin is float:
        return {"type": float, "metavar": "X"}
    if origin is dict:
        return {"type": _scheduler_override, "nargs": "+", "metavar": "KEY=VALUE"}
    return {"type": str}  # text the contract parses (a resolution "768x512")


def _help(name: str, info: FieldInfo) -> str:
    text = info.description or ""
    default = info.get_default(call_default_factory=True)
    empty = default is None or default is False or default == "" or default == {}
    if not info.is_required() and not empty:
        text += f" Default: {default}"
        text += f"; {EXTRA_HELP[name]}." if name in EXTRA_HELP else "."
    elif name in EXTRA_HELP:
        text += f" {EXTRA_HELP[name]}."
    return text.replace("%", "%%")  # argparse formats help with %


def add_parameter_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter of the contract, in the contract's order."""
    for name, info in InversionParams.model_fields.items():
        parser.add_argument(
            flag_of(name),
            dest=name,
            default=None,
            required=info.is_required(),
            help=_help(name, info),
            **_kind(info),
        )


def parameters_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters the flags gave, by the contract's names; those not given are absent.

    `--method null_text` without `--guidance-scale` guides at NULL_TEXT_GUIDANCE_SCALE:
    null-text inversion needs guidance, and the contract's default (1.0) has none.
    """
    given: dict[str, Any] = {}
    for name, info in InversionParams.model_fields.items():
        value = getattr(args, name)
        if value is None:
            continue
        if outer_type(info)[0] is dict:
            value = dict(value)
        given[name] = value
    if given.get("method") == "null_text" and "guidance_scale" not in given:
        given["guidance_scale"] = NULL_TEXT_GUIDANCE_SCALE
    return given
