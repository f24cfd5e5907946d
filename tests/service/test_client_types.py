"""The browser client's JSDoc types follow the OpenAPI schema, property by property.

Fails when a parameter, a status field or a result figure is added, renamed, retyped or
made optional on one side only: service/static/inversion-client.js must follow.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from service.app import create_app
from service.routes.page import STATIC_DIR
from service.settings import GatewaySettings

CLIENT = STATIC_DIR / "inversion-client.js"
SUBMIT_TYPEDEF = "SubmitParams"
"""The typedef of the submission's fields: either request body's schema, less the image."""
SUBMIT_BODIES = ("multipart/form-data", "application/json")
"""The encodings of a submission (the client's BODY_ENCODERS `form` and `json`)."""

_BLOCK = re.compile(r"/\*\*(.*?)\*/", re.S)
_TYPEDEF = re.compile(r"@typedef\s+\{(.*?)\}\s+(\w+)", re.S)
_PROPERTY = re.compile(r"@property\s+\{([^}]*)\}\s+(\[?)(\w+)")
_JSON_TO_JS = {
    "integer": "number",
    "number": "number",
    "string": "string",
    "boolean": "boolean",
    "array": "Array",
    "object": "Object",
    "null": "null",
}


def typedefs(source: str) -> dict[str, dict[str, tuple[set[str], bool]]]:
    """{typedef: {property: (its JSDoc type names, optional)}}; a literal union typedef
    (`"a"|"b"`) maps to {value: ({"literal"}, False)}."""
    out: dict[str, dict[str, tuple[set[str], bool]]] = {}
    for block in _BLOCK.findall(source):
        text = re.sub(r"^\s*\* ?", "", block, flags=re.M)
        found = _TYPEDEF.search(text)
        if found is None:
            continue
        kind, name = found.groups()
        if kind.strip() == "Object":
            out[name] = {
                prop: (type_names(jsdoc), bool(bracket))
                for jsdoc, bracket, prop in _PROPERTY.findall(text)
            }
        elif re.fullmatch(r'\s*"[^"]+"(\s*\|\s*"[^"]+")*\s*', kind):
            out[name] = {value: ({"literal"}, False) for value in re.findall(r'"([^"]+)"', kind)}
    return out


def type_names(jsdoc: str) -> set[str]:
    """`Array<number>|null` -> {"Array", "null"}: the outer names of a union."""
    depth, parts, current = 0, [], ""
    for char in jsdoc:
        depth += char == "<"
        depth -= char == ">"
        if char == "|" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return {part.strip().split("<")[0] for part in parts}


def schema_types(prop: dict[str, Any], schemas: dict[str, Any], named: set[str]) -> set[str]:
    """The JSDoc type names a JSON schema property must admit: a `$ref` to a schema that
    has a typedef by the typedef's name, any other as its JSON type."""
    if "anyOf" in prop:
        return set().union(*(schema_types(p, schemas, named) for p in prop["anyOf"]))
    if "$ref" in prop:
        ref = prop["$ref"].rsplit("/", 1)[1]
        return {ref} if ref in named else schema_types(schemas[ref], schemas, named)
    return {_JSON_TO_JS[prop["type"]]}


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    return create_app(GatewaySettings(auth_disabled=True)).openapi()


@pytest.fixture(scope="module")
def declared() -> dict[str, dict[str, tuple[set[str], bool]]]:
    return typedefs(CLIENT.read_text())


def submit_schema(openapi: dict[str, Any], media_type: str) -> dict[str, Any]:
    """The request body's schema for one content type (inline: the route reads its body)."""
    body = openapi["paths"]["/v1/inversions"]["post"]["requestBody"]["content"]
    schema: dict[str, Any] = body[media_type]["schema"]
    return schema


def api_schemas(openapi: dict[str, Any]) -> set[str]:
    """Every schema the /v1/inversions routes take or answer with on success, followed
    through refs. (FastAPI also lists its own 422 body, which the gateway replaces with
    problem+json: the client's Problem typedef.)"""
    used = []
    for path, operations in openapi["paths"].items():
        if path.startswith("/v1/inversions"):
            for operation in operations.values():
                used.append(operation.get("requestBody"))
                used += [v for k, v in operation["responses"].items() if k.startswith("2")]
    text = repr(used)
    todo = set(re.findall(r"#/components/schemas/(\w+)", text))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        seen.add(name)
        schema = repr(openapi["components"]["schemas"][name])
        todo |= set(re.findall(r"#/components/schemas/(\w+)", schema)) - seen
    return seen


def test_every_schema_of_the_api_has_a_typedef(openapi, declared):
    wanted = api_schemas(openapi) - {"ErrorCode"}
    missing = sorted(wanted - set(declared))
    assert not missing, f"inversion-client.js lacks typedefs for {missing}"
    assert SUBMIT_TYPEDEF in declared


@pytest.mark.parametrize(
    "typedef",
    [
        *(f"{SUBMIT_TYPEDEF}:{media_type}" for media_type in SUBMIT_BODIES),
        "JobAccepted",
        "JobUrls",
        "JobView",
        "Progress",
        "Timings",
        "JobError",
        "JobParams",
        "ResultMetadata",
        "Problem",
    ],
)
def test_typedef_properties_follow_the_schema(openapi, declared, typedef):
    schemas = openapi["components"]["schemas"]
    if typedef.startswith(SUBMIT_TYPEDEF):
        typedef, media_type = typedef.split(":")
        schema = submit_schema(openapi, media_type)
        properties = {k: v for k, v in schema["properties"].items() if k != "image"}
        required = set(schema.get("required", ())) - {"image"}
    else:
        schema = schemas[typedef]
        properties, required = schema["properties"], set(schema.get("required", ()))
    props = declared[typedef]
    differ = sorted(set(props) ^ set(properties))
    assert not differ, f"{typedef}: only one of JSDoc and OpenAPI has {differ}"
    for name, prop in properties.items():
        names, optional = props[name]
        assert optional == (name not in required), f"{typedef}.{name}: optional or not"
        wanted = schema_types(prop, schemas, set(declared))
        assert wanted <= names, f"{typedef}.{name}: JSDoc {names} does not admit {wanted}"


def test_the_status_union_is_the_schemas_enum(openapi, declared):
    assert set(declared["JobStatus"]) == set(openapi["components"]["schemas"]["JobStatus"]["enum"])


def test_the_checker_sees_a_drift():
    """The parser reads what it must: a renamed, retyped or missing property is seen."""
    source = CLIENT.read_text()
    renamed = source.replace("@property {number} step\n", "@property {number} steps\n")
    assert set(typedefs(renamed)["Progress"]) == {"steps", "total"}
    retyped = source.replace("@property {boolean} truncated", "@property {string} truncated")
    assert typedefs(retyped)["ResultMetadata"]["truncated"] == ({"string"}, False)
    declared = typedefs(source)
    assert declared["JobView"]["progress"] == ({"Progress", "null"}, True)
    assert declared[SUBMIT_TYPEDEF]["prompt"] == ({"string"}, False)
