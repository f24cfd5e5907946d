"""POST /v1/inversions: submit an image. (The job's other routes: status.py, downloads.py,
events.py; the submission itself: service/submission.py.)"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Request, Response, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service import bodies, protocol, submission
from service.deps import (
    DecodersDep,
    ListenerDep,
    MetricsDep,
    OwnerDep,
    RedisDep,
    SettingsDep,
)
from service.routes.v1 import INVERSIONS_PREFIX, v1_router
from service.routes.v1 import PROBLEM as _PROBLEM
from service.schemas import JobAccepted, JobUrls, JobView

router = v1_router(INVERSIONS_PREFIX, "inversions")


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    summary="Submit an image for DDIM inversion",
    openapi_extra=bodies.OPENAPI,
    responses={
        200: {
            "model": JobView,
            "description": "The job ended within `Prefer: wait=N`, or an Idempotency-Key "
            "replay of an ended job: the full status body",
        },
        400: _PROBLEM,  # a multipart body Starlette cannot parse
        413: _PROBLEM,
        415: _PROBLEM,
        422: _PROBLEM,
        429: _PROBLEM,
        503: _PROBLEM,
    },
)
async def submit_inversion(
    request: Request,
    body: bodies.SubmissionBody,
    listener: ListenerDep,
    decoders: DecodersDep,
    redis: RedisDep,
    settings: SettingsDep,
    owner: OwnerDep,
    metrics: MetricsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Same key and payload: the same job, never a second one.",
            json_schema_extra={"pattern": protocol.IDEMPOTENCY_KEY_PATTERN},
        ),
    ] = None,
    prefer: Annotated[
        str | None, Header(description="`wait=N`: answer 200 if the job ends within N s.")
    ] = None,
) -> Any:
    """Validate everything a worker would refuse, store the normalised image, enqueue.

    The body is multipart (the image as a file) or JSON (the image as base64 or a `data:`
    URL), with the same fields: the parameters of the table in the README. Answers 202 with
    the job's URLs; poll `GET /v1/inversions/{id}` until it succeeds. With `Prefer: wait=N`
    it first waits up to N seconds (capped) and answers 200 with the full status body if
    the job ended; a key that already holds its limit of open waits and streams gets the
    202 at once, without `Preference-Applied`. An `Idempotency-Key` seen before with the
    same payload answers the original job (200 once ended) and queues nothing.
    """
    wait_s = protocol.preferred_wait(request.headers.getlist("prefer"), settings.max_prefer_wait_s)
    job_id, replayed, (code, answer) = await submission.accept(
        decoders, redis, settings, owner, metrics, body, idempotency_key
    )
    if not isinstance(body.image, str):
        body.image.close()  # its bytes are stored: its temporary file goes before any wait
    headers = {"Location": JobUrls.for_job(job_id).self}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait_s is not None and code == status.HTTP_202_ACCEPTED:
        # Over the key's limit of open waits the preference is not applied (RFC 7240): the
        # job is queued all the same, and the 202 says so at once.
        if listener.admit(owner, protocol.waiter_limit(owner, settings)):
            headers["Preference-Applied"] = f"wait={wait_s}"
            try:
                waited = await protocol.wait_while_connected(
                    listener, job_id, wait_s, request.receive
                )
            finally:
                listener.leave(owner)
            if waited is None:  # the client is gone: nobody reads the answer
                return Response(status_code=status.HTTP_202_ACCEPTED, headers=headers)
            code, answer = await run_in_threadpool(
                submission.answer, redis, settings, owner, job_id
            )
    elif wait_s is not None:
        headers["Preference-Applied"] = f"wait={wait_s}"
    return JSONResponse(answer, status_code=code, headers=headers)
