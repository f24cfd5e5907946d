"""RFC 9457 problem details: the one shape of every error the gateway answers.

Each problem carries the contract's stable `code` (clients switch on it, not on `title`),
a URI `type` derived from it, and, for a bad parameter, the `field` that caused it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ddim_inversion.errors import ErrorCode

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://ddim-inversion.dev/problems/"
RETRY_AFTER_S = 5
"""What a 503 or 429 asks the client to wait before it tries again."""

_CODE_BY_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.VALIDATION_ERROR,
    401: ErrorCode.UNAUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.VALIDATION_ERROR,
    409: ErrorCode.NOT_FINISHED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.VALIDATION_ERROR,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.SERVICE_UNAVAILABLE,
}


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


class Problem(BaseModel):
    """The body of every error answer, and its schema in the OpenAPI document."""

    type: str = Field(description="A URI naming the problem, derived from `code`.")
    title: str = Field(description="The HTTP status's phrase.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong, for a person.")
    code: ErrorCode = Field(description="The stable code clients switch on.")
    # Absent only from the refusals of a request head never read whole (http_protocol.py).
    instance: str | None = Field(default=None, description="The request's path.")
    field: str | None = Field(default=None, description="The parameter at fault, if one is.")


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem+json of this status and code."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        detail: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})


def problem_response(
    request: Request,
    status: int,
    code: ErrorCode,
    detail: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The problem+json response; `instance` is the request path, so logs can be matched."""
    body = Problem(
        type=PROBLEM_TYPE_BASE + code.value,
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        code=code,
        instance=request.url.path,
        field=field,
    ).model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def field_from_loc(loc: Sequence[Any]) -> str | None:
    """`("body", "num_inference_steps")` -> "num_inference_steps"; None for a whole-model error."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def describe_errors(errors: Sequence[Mapping[str, Any]]) -> tuple[str | None, str]:
    """The first error's field and a one-line detail naming every error."""
    field = field_from_loc(errors[0].get("loc", ())) if errors else None
    lines = []
    for error in errors:
        where = field_from_loc(error.get("loc", ()))
        message = str(error.get("msg", "invalid"))
        lines.append(f"{where}: {message}" if where else message)
    return field, "; ".join(lines) or "invalid request"


async def _problem_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(request, exc.status, exc.code, exc.detail, exc.field, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    field, detail = describe_errors(exc.errors())
    return problem_response(request, 422, ErrorCode.VALIDATION_ERROR, detail, field)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _CODE_BY_STATUS.get(
        status, ErrorCode.INTERNAL if status >= 500 else ErrorCode.VALIDATION_ERROR
    )
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    if status == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}"
    headers = dict(exc.headers or {})
    if status == 405:
        # Starlette's Allow names the methods of the first route on the path only, and
        # GET and DELETE of a job are two routes.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return problem_response(request, status, code, detail, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves on the request's path (asked of the
    routes with a fresh scope: the request's own has been through routing already)."""
    base = {
        "type": "http",
        "path": request.scope["path"],
        "root_path": request.scope.get("root_path", ""),
        "headers": [],
    }
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**base, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    ]


async def _redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("redis unavailable: %s", exc)
    return problem_response(
        request,
        503,
        ErrorCode.SERVICE_UNAVAILABLE,
        "the job store is unreachable; try again shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _redis_full(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("redis refused a write, out of memory: %s", exc)
    return problem_response(
        request,
        503,
        ErrorCode.SERVICE_UNAVAILABLE,
        "the job store is full; try again shortly (finished jobs' results expire, and "
        "deleting them frees space)",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, 500, ErrorCode.INTERNAL, "internal error; it has been logged")


def _document_problems(app: FastAPI) -> None:
    """Make the app's OpenAPI document say what the handlers answer: every problem+json
    response carries the `Problem` schema, and FastAPI's own 422 body, which the gateway
    never sends, becomes a problem too."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _use_problems(default())  # FastAPI's document, which it keeps as openapi_schema
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _use_problems(document: dict[str, Any]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, schema in problem.pop("$defs", {}).items():
        schemas.setdefault(name, schema)
    schemas["Problem"] = problem
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for operations in document["paths"].values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if status == "422" or PROBLEM_MEDIA_TYPE in response.get("content", {}):
                    response["content"] = dict(content)
                    if status == "422":
                        response["description"] = "Problem details (RFC 9457)"


def install_error_handlers(app: FastAPI) -> None:
    """Every error path answers problem+json, including routing errors, Redis outages and a
    Redis out of memory; the OpenAPI document says so."""
    _document_problems(app)
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(redis.exceptions.ConnectionError, _redis_unavailable)
    app.add_exception_handler(redis.exceptions.TimeoutError, _redis_unavailable)
    app.add_exception_handler(redis.exceptions.OutOfMemoryError, _redis_full)
    app.add_exception_handler(Exception, _internal_error)
