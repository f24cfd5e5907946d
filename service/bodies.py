"""The two bodies of `POST /v1/inversions`, both derived from the contract.

- `multipart/form-data` (`SubmissionForm`): the image as a file, each parameter a text
  field; `scheduler` is a JSON object in its field.
- `application/json` (`SubmissionJson`): the image as base64 or a `data:` URL, each
  parameter a JSON value; `scheduler` is an object.

Both are built from `submission_fields()` (ddim_inversion/params.py): the same names, types,
defaults, bounds, descriptions and examples, so the OpenAPI schema documents the contract
and a new parameter needs nothing here. A parameter whose contract type is a pair
(`resolution`) travels as text (`768x512`), which the contract parses.

FastAPI chooses one body parser per route from the route's parameters; a route that takes
either content type reads its body itself, here: `read_submission`, a dependency, reads it
by Content-Type, refuses unknown fields by name and checks it against its body's model.
What the model cannot see (cross-field rules, the scheduler's names, this gateway's limits)
is checked by uploads.build_params through the contract itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from copy import copy
from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO

from fastapi import Depends, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from ddim_inversion.errors import ErrorCode
from ddim_inversion.params import InversionParams, outer_type, submission_fields
from service import json_body, limits
from service.deps import OwnerDep, RedisDep, SettingsDep
from service.errors import ProblemError, describe_errors

FORM_MEDIA_TYPE = "multipart/form-data"
JSON_MEDIA_TYPE = "application/json"

IMAGE_FORMATS = "PNG, JPEG, WEBP, BMP, TIFF or GIF (decided from the bytes)."
_PIXEL_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8ISfHgA0wMeAAg1MCANDKARQf"
    "GKMRAAAAAElFTkSuQmCC"
)
"""An 8x8 PNG as base64: the JSON body's example, small enough to read."""

FIELDS: frozenset[str] = frozenset(submission_fields()) | {"image"}
"""Every field a submission may carry, in either body; anything else is refused by name."""


def _wire_fields(form: bool) -> dict[str, Any]:
    """Each field of the contract as a body carries it, with the contract's FieldInfo
    (default, bounds, description, examples)."""
    fields: dict[str, Any] = {}
    for name, info in submission_fields().items():
        kind = outer_type(info)[0]
        if kind is tuple:  # text the contract parses: "512", "768x512"
            fields[name] = (str | None, copy(info))
        elif kind is dict and form:
            examples = [json.dumps(example) for example in info.examples or ()]
            described = (
                f"{info.description} A JSON object, e.g. {examples[0] if examples else '{}'}."
            )
            fields[name] = (str | None, Field(None, description=described, examples=examples))
        else:
            fields[name] = (info.annotation, copy(info))
    return fields


_STRICT = ConfigDict(extra="forbid")

SubmissionForm: type[BaseModel] = create_model(
    "SubmissionForm",
    __config__=_STRICT,
    __doc__="POST /v1/inversions as multipart/form-data: the image file and the parameters.",
    image=(UploadFile, Field(description=IMAGE_FORMATS)),
    **_wire_fields(form=True),
)

SubmissionJson: type[BaseModel] = create_model(
    "SubmissionJson",
    __config__=_STRICT,
    __doc__="POST /v1/inversions as application/json: the image as base64 and the parameters.",
    image=(
        str,
        Field(
            description=f"The image's bytes as base64, or a data: URL of them. {IMAGE_FORMATS}",
            examples=[f"data:image/png;base64,{_PIXEL_PNG}"],
        ),
    ),
    **_wire_fields(form=False),
)


@dataclass(frozen=True)
class Submission:
    """One submission as either body carried it, checked against its body's model."""

    fields: dict[str, Any]
    """The contract's parameters (absent ones at their defaults, None: the contract's)."""
    image: BinaryIO | str
    """The uploaded file, or the JSON body's base64 text (decoded by uploads.read_image)."""
    webhook_url: str | None


def _invalid(field: str | None, detail: str) -> ProblemError:
    return ProblemError(422, ErrorCode.VALIDATION_ERROR, detail, field=field)


def reject_unknown_fields(names: set[str]) -> None:
    """A misspelt parameter must fail loudly, not be silently ignored."""
    unknown = sorted(names - FIELDS)
    if unknown:
        raise _invalid(
            unknown[0],
            f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(FIELDS))}",
        )


def _checked(model: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        field, detail = describe_errors(exc.errors(include_url=False))
        raise _invalid(field, detail) from None


def _parameters(body: BaseModel) -> dict[str, Any]:
    return {name: getattr(body, name) for name in InversionParams.model_fields}


def from_form(form: FormData, max_items: int) -> Submission:
    """A multipart body: an empty text field counts as absent (as FastAPI's forms do), a
    mapping parameter is a JSON object in its field."""
    reject_unknown_fields(set(form.keys()))
    body = _checked(SubmissionForm, {name: value for name, value in form.items() if value != ""})
    fields = _parameters(body)
    for name, value in fields.items():
        if outer_type(InversionParams.model_fields[name])[0] is dict and value is not None:
            fields[name] = _json_object(name, value, max_items)
    image = body.image  # type: ignore[attr-defined]
    return Submission(fields, image.file, body.webhook_url)  # type: ignore[attr-defined]


def from_json(data: bytes, max_items: int) -> Submission:
    """A JSON body: one object of the same fields, the image as base64 text; each list
    and object at most `max_items` members, counted while parsing (json_body)."""
    values = _parsed(data, None, max_items)
    if not isinstance(values, dict):
        raise _invalid(None, "the body must be a JSON object: image, prompt and parameters")
    reject_unknown_fields(set(values))
    body = _checked(SubmissionJson, values)
    return Submission(_parameters(body), body.image, body.webhook_url)  # type: ignore[attr-defined]


def _parsed(text: str | bytes, name: str | None, max_items: int) -> Any:
    """The JSON of a body (name None) or of a form's field, bounded, its text encodable."""
    try:
        value = json_body.loads(text, max_items)
        json_body.check_text(value, name)
    except json_body.BodyRefused as exc:
        if exc.field is not None:
            raise _invalid(exc.field, exc.message) from None
        # "the body is not valid JSON: ...", or, of a form's field, "is not valid JSON: ...".
        raise _invalid(name, exc.message if name else f"the body {exc.message}") from None
    return value


def _json_object(name: str, text: str, max_items: int) -> dict[str, Any]:
    if not text.strip():
        return {}
    value = _parsed(text, name, max_items)
    if not isinstance(value, dict):
        raise _invalid(name, "must be a JSON object")
    return value


def is_json(content_type: str | None) -> bool:
    """`application/json`, with parameters or as a `+json` suffix."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == JSON_MEDIA_TYPE or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_submission(
    request: Request, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
) -> AsyncIterator[Submission]:
    """The submission in the request's body, by its Content-Type (a form otherwise); an
    uploaded file is closed once the answer is sent (its temporary file removed).

    The submission counts against the key's rate first, before its body is read: a body
    refused as invalid has cost the gateway its parsing, and counts like any other."""
    await run_in_threadpool(limits.count_submission, redis, settings, owner)
    max_items = settings.max_train_timesteps
    if is_json(request.headers.get("content-type")):
        yield await run_in_threadpool(from_json, await request.body(), max_items)
        return
    form = await request.form()
    try:
        yield from_form(form, max_items)
    finally:
        await form.close()


SubmissionBody = Annotated[Submission, Depends(read_submission)]

OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            FORM_MEDIA_TYPE: {"schema": SubmissionForm.model_json_schema()},
            JSON_MEDIA_TYPE: {
                "schema": SubmissionJson.model_json_schema(),
                # A whole body that is accepted: the fields' own examples, put together,
                # break cross-field rules (`eta` is for `ddpm` only, say).
                "example": {
                    "image": f"data:image/png;base64,{_PIXEL_PNG}",
                    "prompt": "a photo of a cat",
                },
            },
        },
    }
}
"""The route's request body in OpenAPI, both content types (FastAPI sees no body param)."""
