"""Every inversion parameter is declared once, in the contract, and reaches every surface.

For each field of `InversionParams` (and of `SubmissionOptions` where a surface carries
it): both HTTP bodies and their OpenAPI schemas (with the contract's default, bounds and
description), a flag of `ddim-invert local` and `ddim-invert submit` that sets it, a row of
the README's table, the page's form or the list of what the page leaves out, and the
Python client in both encodings. A parameter added to the contract and missing anywhere
fails here.
"""

from __future__ import annotations

import argparse
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from ddim_inversion.params import (
    NULL_TEXT_GUIDANCE_SCALE,
    InversionParams,
    SubmissionOptions,
    submission_fields,
)
from ddim_inversion_cli.flags import flag_of, parameters_from_args
from ddim_inversion_cli.main import build_parser
from ddim_inversion_client._common import Transport
from service.app import create_app
from service.bodies import SubmissionForm, SubmissionJson
from service.routes.page import STATIC_DIR
from service.settings import GatewaySettings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import params_doc  # noqa: E402

PARAMETERS = list(InversionParams.model_fields)
FIELDS = list(submission_fields())

PAGE_LEAVES_OUT = frozenset(
    {
        "resize_mode",
        "encode_mode",
        "seed",
        "return_trajectory",
        "result_dtype",
        "scheduler",
        "refine_tolerance",
        "null_text_inner_steps",
        "null_text_learning_rate",
        "null_text_early_stop",
        "webhook_url",
        "prompt_2",
        "negative_prompt_2",
        "original_size",
        "crops_coords_top_left",
        "target_size",
    }
)
"""The fields the page's form does not offer (the API and the clients do): a new one is a
choice made here or a control added to service/static/index.html."""


COMPANIONS: dict[str, dict[str, Any]] = {
    "method": {"guidance_scale": 2.0},  # the sample, null_text, needs guidance
    "encode_mode": {"seed": 1},  # the sample, sample, needs a seed
    "eta": {"method": "ddpm"},
    "edict_mixing": {"method": "edict"},
}
"""What a parameter's sample value needs beside it to make a valid job: the contract refuses
impossible combinations (eta without ddpm, ...), so each sample is checked with these."""


@pytest.fixture(scope="module")
def openapi_bodies() -> dict[str, dict[str, Any]]:
    schema = create_app(GatewaySettings(auth_disabled=True)).openapi()
    content = schema["paths"]["/v1/inversions"]["post"]["requestBody"]["content"]
    return {media_type: body["schema"] for media_type, body in content.items()}


# -- the HTTP bodies -----------------------------------------------------------------------


def test_both_bodies_carry_exactly_the_contracts_fields_and_the_image(openapi_bodies):
    assert set(openapi_bodies) == {"multipart/form-data", "application/json"}
    for model in (SubmissionForm, SubmissionJson):
        assert list(model.model_fields) == ["image", *FIELDS]
    for schema in openapi_bodies.values():
        assert list(schema["properties"]) == ["image", *FIELDS]
        assert set(schema["required"]) == {"image", "prompt"}
        assert schema["additionalProperties"] is False


@pytest.mark.parametrize("name", FIELDS)
def test_the_schema_states_the_contracts_default_bounds_and_description(openapi_bodies, name):
    contract = {
        **InversionParams.model_json_schema()["properties"],
        **SubmissionOptions.model_json_schema()["properties"],
    }[name]
    for schema in openapi_bodies.values():
        prop = schema["properties"][name]
        assert prop["description"].startswith(contract["description"])
        if contract.get("default") is not None:  # FastAPI's OpenAPI leaves out nulls
            assert prop["default"] == contract["default"]
        for key in ("minimum", "maximum", "exclusiveMinimum", "enum"):
            if key in contract:
                assert prop[key] == contract[key], key
        bounds = [s for s in contract.get("anyOf", ()) if "minimum" in s or "maximum" in s]
        if bounds:
            assert bounds[0] in prop["anyOf"]


# -- the CLI -------------------------------------------------------------------------------


def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _sample(name: str) -> tuple[list[str], Any]:
    """The flag's words for a value other than the contract's default, and that value as
    the contract holds it."""
    info = InversionParams.model_fields[name]
    flag = flag_of(name)
    default = info.get_default(call_default_factory=True)
    if name == "prompt":
        return [flag, "a cat"], "a cat"
    if name == "resolution":
        return [flag, "128x64"], (128, 64)
    if name == "model":
        return [flag, "sd-2-base"], "sd-2-base"
    if name in ("original_size", "crops_coords_top_left", "target_size"):
        return [flag, "512,768"], (512, 768)
    if name in ("prompt_2", "negative_prompt_2"):
        return [flag, "blurry"], "blurry"
    if name == "scheduler":
        return [flag, "timestep_spacing=trailing", "steps_offset=0"], {
            "timestep_spacing": "trailing",
            "steps_offset": 0,
        }
    if isinstance(default, bool):
        return [flag], not default
    choices = getattr(info.annotation, "__args__", ())
    if isinstance(default, str) and choices:
        value = next(choice for choice in choices if choice != default)
        return [flag, value], value
    if isinstance(default, str):
        return [flag, "blurry"], "blurry"
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "le", "gt") if hasattr(m, k)}
    low = bounds.get("ge", bounds.get("gt", 0))
    value = (low + bounds["le"]) / 2 if "le" in bounds else (default or 0) * 2 + 1
    value = int(value) if "int" in str(info.annotation) else value
    return [flag, str(value)], value


@pytest.mark.parametrize("command", ["local", "submit"])
def test_every_parameter_is_a_flag_that_sets_it(command):
    """All flags at once, each to a value other than its default: the contract gets each."""
    parser = _subcommand(command)
    assert {a.dest for a in parser._actions} >= set(PARAMETERS)
    argv, expected = [], {}
    for name in PARAMETERS:
        words, value = _sample(name)
        argv += words
        expected[name] = value
    given = parameters_from_args(parser.parse_args([*argv, "image.png"]))
    assert list(given) == PARAMETERS
    # Each value as the contract holds it, beside what it needs (not all at once: some
    # samples exclude each other, as eta and edict_mixing do).
    for name in PARAMETERS:
        fields = {"prompt": "a cat", **COMPANIONS.get(name, {}), name: given[name]}
        assert getattr(InversionParams(**fields), name) == expected[name], name


@pytest.mark.parametrize("command", ["local", "submit"])
def test_the_flags_keep_their_names_and_a_flag_left_out_is_the_contracts_default(command):
    parser = _subcommand(command)
    old_names = ["--steps", "7", "--encode", "sample", "--seed", "3", "--trajectory"]
    pairs = ["--scheduler", "timestep_spacing=trailing", "clip_sample=false"]
    args = parser.parse_args(["x.png", "--prompt", "p", *old_names, *pairs])
    assert parameters_from_args(args) == {
        "prompt": "p",
        "num_inference_steps": 7,
        "encode_mode": "sample",
        "seed": 3,
        "return_trajectory": True,
        "scheduler": {"timestep_spacing": "trailing", "clip_sample": False},
    }
    bare = parameters_from_args(parser.parse_args(["x.png", "--prompt", "p"]))
    assert bare == {"prompt": "p"}
    assert InversionParams(**bare) == InversionParams(prompt="p")


def test_null_text_without_a_guidance_flag_guides_at_the_usual_scale():
    parser = _subcommand("local")
    args = parser.parse_args(["x.png", "--prompt", "p", "--method", "null_text"])
    assert parameters_from_args(args)["guidance_scale"] == NULL_TEXT_GUIDANCE_SCALE
    given = parser.parse_args(
        ["x.png", "--prompt", "p", "--method", "null_text", "--guidance-scale", "3"]
    )
    assert parameters_from_args(given)["guidance_scale"] == 3.0


@pytest.mark.parametrize("words", [["--steps", "many"], ["--method", "pix2pix"], ["--prompt"]])
def test_a_flag_of_the_wrong_type_is_refused_by_argparse(words, capsys):
    with pytest.raises(SystemExit) as exit:
        _subcommand("local").parse_args(["x.png", "--prompt", "p", *words])
    assert exit.value.code == 2
    assert words[0] in capsys.readouterr().err


# -- the README, the page and the client ---------------------------------------------------


def test_every_field_is_a_row_of_the_readme_table():
    table = params_doc.readme_section((ROOT / "README.md").read_text())
    rows = [line.split("|")[1].strip(" `") for line in table.splitlines()[2:]]
    assert rows == FIELDS


class _Controls(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        name = dict(attrs).get("name")
        if tag in ("input", "select", "textarea") and name:
            self.names.add(name)


def test_every_field_is_on_the_page_or_left_out_by_choice():
    page = _Controls()
    page.feed((STATIC_DIR / "index.html").read_text())
    missing = [name for name in FIELDS if name not in page.names | PAGE_LEAVES_OUT]
    assert not missing, f"neither on the page nor in PAGE_LEAVES_OUT: {missing}"
    assert not PAGE_LEAVES_OUT & page.names, "on the page after all"
    assert set(FIELDS) >= PAGE_LEAVES_OUT


@pytest.mark.parametrize("name", FIELDS)
def test_the_python_client_sends_every_field_in_both_bodies(name):
    info = submission_fields()[name]
    sample = info.examples[0] if info.examples else info.get_default(call_default_factory=True)
    transport = Transport("http://gateway.test", None, None)
    params = {} if name == "prompt" else {name: sample}
    form = transport.submit(b"png", "a cat", params, "form")
    by_json = transport.submit(b"png", "a cat", params, "json")
    assert form.data is not None and by_json.json is not None
    assert name in form.data and name in by_json.json


def test_the_python_client_refuses_a_misspelt_parameter_naming_the_valid_ones():
    transport = Transport("http://gateway.test", None, None)
    with pytest.raises(TypeError) as refused:
        transport.submit(b"png", "a cat", {"steps": 10, "num_inference_steps": 10})
    message = str(refused.value)
    assert "steps" in message.split(";")[0]
    assert all(name in message for name in FIELDS if name != "prompt")
