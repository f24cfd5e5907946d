"""Turning a submission into valid parameters and a normalised RGB array.

Cheap checks run first (lengths, limits); the image itself is decoded last, in a decoder
process (service/decode_pool.py), so a hostile upload costs the gateway little. The image
is an upload (a multipart body) or base64 text (a JSON body): the same limits apply to
its bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from typing import Any, BinaryIO

from pydantic import ValidationError

from ddim_inversion import webhook_policy
from ddim_inversion.contract import ModelInfo
from ddim_inversion.errors import ErrorCode, InvalidParameter
from ddim_inversion.params import InversionParams
from ddim_inversion.scheduler_config import resolve_scheduler_config
from service import prompts
from service.errors import ProblemError, describe_errors
from service.settings import GatewaySettings

CHUNK_BYTES = 1024 * 1024


def _invalid(field: str | None, detail: str) -> ProblemError:
    return ProblemError(422, ErrorCode.VALIDATION_ERROR, detail, field=field)


def build_params(fields: dict[str, Any], settings: GatewaySettings) -> InversionParams:
    """The contract's parameters from the fields given (None: not given, the default),
    within this gateway's limits."""
    given = {name: value for name, value in fields.items() if value is not None}
    for name in ("prompt", "negative_prompt"):
        text = given.get(name, "")
        if len(text) > settings.max_prompt_chars:
            raise _invalid(
                name, f"{len(text)} characters; the limit is {settings.max_prompt_chars}"
            )
    try:
        params = InversionParams(**given)
    except ValidationError as exc:
        field, detail = describe_errors(exc.errors(include_url=False))
        raise _invalid(field, detail) from None
    n_train = params.scheduler.get("num_train_timesteps", 0)
    if n_train > settings.max_train_timesteps:
        raise _invalid(
            "scheduler.num_train_timesteps",
            f"{n_train} exceeds this service's limit of {settings.max_train_timesteps}",
        )
    if params.num_inference_steps > settings.max_steps:
        raise _invalid(
            "num_inference_steps",
            f"{params.num_inference_steps} exceeds this service's limit of {settings.max_steps}",
        )
    if params.resolution is not None:
        width, height = params.resolution
        if width * height > settings.max_pixels:
            # Unbounded, the gateway would allocate the resized image (MemoryError, 500).
            raise _invalid(
                "resolution",
                f"{width}x{height} = {width * height} pixels; the limit is {settings.max_pixels}",
            )
    return params


def check_webhook_url(url: str | None, settings: GatewaySettings) -> str | None:
    """The webhook URL if webhook_policy allows it (scheme, host, port, address); else 422."""
    if url is None or not url.strip():
        return None
    try:
        webhook_policy.check_submission(
            url.strip(),
            settings.webhook_allowed_hosts,
            settings.webhook_allowed_ports,
            settings.webhook_allow_private,
        )
    except webhook_policy.WebhookRefused as exc:
        raise _invalid("webhook_url", str(exc)) from None
    return url.strip()


def payload_hash(data: bytes, params: InversionParams, webhook_url: str | None) -> str:
    """SHA-256 of what a submission asks for: an idempotency key replays only the same one."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(data).digest())
    digest.update(params.model_dump_json().encode())
    digest.update((webhook_url or "").encode())
    return digest.hexdigest()


def base64_length(size: int) -> int:
    """The length of `size` bytes as padded base64: 4 characters per 3 bytes."""
    return 4 * -(-size // 3)


def read_image(image: BinaryIO | str, max_bytes: int) -> bytes:
    """A submission's image bytes: an upload, or the base64 text of a JSON body."""
    if isinstance(image, str):
        return read_base64(image, max_bytes)
    return read_upload(image, max_bytes)


def read_base64(text: str, max_bytes: int) -> bytes:
    """The bytes of base64 text or of a `data:` URL carrying base64, within the limit.

    The limit is checked on the text's length before decoding; the format is decided from
    the decoded bytes, as for an upload (a data: URL's media type is not trusted).
    """
    if text[:5].lower() == "data:":
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise _invalid(
                "image", "a data: URL must carry base64, as in data:image/png;base64,iVBORw0…"
            )
    encoded = "".join(text.split())  # MIME wraps base64 in lines
    if len(encoded) > base64_length(max_bytes):
        raise _too_large(max_bytes)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid("image", f"not valid base64 (standard alphabet, padded): {exc}") from None
    return read_upload(io.BytesIO(data), max_bytes)


def _too_large(max_bytes: int) -> ProblemError:
    return ProblemError(
        413,
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"the upload exceeds the limit of {max_bytes} bytes",
        field="image",
    )


def read_upload(file: BinaryIO, max_bytes: int) -> bytes:
    """The upload's bytes, read in chunks, stopping as soon as it passes the limit."""
    chunks: list[bytes] = []
    total = 0
    while chunk := file.read(CHUNK_BYTES):
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    if not total:
        raise _invalid("image", "the upload is empty")
    return b"".join(chunks)


def check_prompt_tokens(connection: Any, params: InversionParams, model: ModelInfo) -> None:
    """422 for a prompt longer than the model reads (INVERSION_PROMPT_OVERFLOW=reject)."""
    tokenizer = prompts.load_tokenizer(connection, model.tokenizer_key)
    if tokenizer is None:
        return  # no tokenizer published: the worker truncates and reports `truncated`
    limit = model.tokenizer_max_length
    for field in ("prompt", "negative_prompt"):
        count = prompts.token_count(tokenizer, getattr(params, field))
        if count > limit:
            raise _invalid(
                field,
                f"is {count} tokens; the model reads at most {limit} (start and end included)",
            )


def target_size(params: InversionParams, model: ModelInfo | None) -> tuple[int, int] | None:
    """The (width, height) the image is normalised to at submit, None for its own size.

    With the job's model's record, the scheduler overrides are checked against its config
    and the image is resized to the target size now, so that only that size travels.
    Without one (a default model no worker announced yet), the combination cannot be
    judged (the model's config decides it) and the image travels unresized unless a
    resolution was asked for; the worker, using the same imaging code, resizes it.
    """
    size = params.resolution
    if model is not None:
        try:
            resolve_scheduler_config(
                model.scheduler_config,
                params.scheduler,
                params.num_inference_steps,
                params.inverse_scheduler,
                params.method,
                params.verify,
            )
        except InvalidParameter as exc:
            raise _invalid(exc.field, exc.message) from None
        size = size or model.native_resolution
    return None if size is None else (size[0], size[1])
