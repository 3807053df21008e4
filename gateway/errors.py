"""Typed API errors and the one handler that maps every exception to OpenAI's error shape.

``{"error": {"message", "type", "param", "code"}}`` with the right status. Tracebacks are
logged, never sent.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import MediaType, Response
from litestar.exceptions import HTTPException, ValidationException

from gateway.engines.base import (
    EngineDeadError,
    EngineError,
    EngineNotReadyError,
    EngineOverloadedError,
    InvalidInputError,
    PromptTooLongError,
)
from gateway.openai.protocol import ErrorBody, ErrorResponse, ParamError, PromptError, encode

if TYPE_CHECKING:
    from litestar import Request

__all__ = [
    "APIError",
    "BadRequestError",
    "ConflictError",
    "ModelNotFoundError",
    "NotFoundError",
    "OverloadedError",
    "ServiceUnavailableError",
    "UnsupportedParameterError",
    "error_response",
    "exception_handler",
]

log = logging.getLogger("retort.errors")


class APIError(Exception):
    status_code = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class BadRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model")


class UnsupportedParameterError(BadRequestError):
    """A known OpenAI field that changes the output and that this gateway does not honour."""

    code = "unsupported_parameter"

    def __init__(self, param: str, why: str = "") -> None:
        super().__init__(
            f"Unsupported parameter: '{param}' is not supported by this server"
            + (f": {why}" if why else "."),
            param=param,
        )


class ConflictError(APIError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class ServiceUnavailableError(APIError):
    status_code = 503
    type = "service_unavailable"
    code = "engine_not_ready"


class OverloadedError(ServiceUnavailableError):
    """The engine's queue is full: 503 with ``Retry-After``."""

    code = "engine_overloaded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.headers: dict[str, str] = {"Retry-After": str(max(1, retry_after))}


_STATUS_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", None),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("service_unavailable", None),
}

_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def _param_from_msgspec(message: str) -> str | None:
    """``Expected `int`, got `str` - at `$.messages[0].role``` -> ``messages[0].role``."""
    m = _PATH_RE.search(message)
    if m:
        return m.group(1) or None
    m = re.search(r"missing required field `([^`]+)`", message)
    return m.group(1) if m else None


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    return Response(
        content=encode(body),
        status_code=status,
        media_type=MediaType.JSON,
        headers=headers,
    )


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to an :class:`APIError` (used by routes and streams alike)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, msgspec.ValidationError | msgspec.DecodeError):
        msg = str(exc)
        return BadRequestError(msg, param=_param_from_msgspec(msg))
    if isinstance(exc, ParamError):
        return BadRequestError(str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, PromptError):
        return BadRequestError(str(exc), param="prompt")
    if isinstance(exc, PromptTooLongError):
        return BadRequestError(str(exc), param=None, code="context_length_exceeded")
    if isinstance(exc, EngineOverloadedError):
        return OverloadedError(str(exc), retry_after=exc.retry_after)
    if isinstance(exc, EngineNotReadyError):
        return ServiceUnavailableError(str(exc) or "The engine is not ready.")
    if isinstance(exc, EngineDeadError):
        # 503: the replica cannot serve anymore (it exits); another one can.
        return ServiceUnavailableError(f"The engine died: {exc}", code="engine_dead")
    if isinstance(exc, EngineError):
        return APIError(f"The engine failed: {exc}", code="engine_error")
    if isinstance(exc, InvalidInputError):
        return BadRequestError(str(exc), param=exc.param)
    return APIError("Internal server error.", code="internal_error")


def exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The single Litestar exception handler."""
    if isinstance(exc, HTTPException) and not isinstance(exc, APIError):
        status = exc.status_code
        type_, code = _STATUS_TYPES.get(status, ("api_error", None))
        message = exc.detail
        param = None
        if isinstance(exc, ValidationException) or status == 400:
            status = 400
            extra = exc.extra
            if isinstance(extra, list) and extra and isinstance(extra[0], dict):
                first = extra[0]
                message = str(first.get("message") or message)
                key = first.get("key")
                param = str(key) if key else _param_from_msgspec(message)
                if param == "data":  # the body as a whole, or a missing field
                    param = _param_from_msgspec(message)
                    if message == "'data'":
                        message = "The request body must be a JSON object."
            if "JSON is malformed" in message or "malformed" in message.lower():
                message = f"We could not parse the JSON body of your request. ({message})"
            if status == 400 and type_ != "invalid_request_error":
                type_ = "invalid_request_error"
        if status == 413:
            message = "Request body is too large."
        headers = dict(exc.headers or {})
        return error_response(status, message, type_, param, code, headers or None)
    err = to_api_error(exc)
    if err.status_code >= 500 and err.status_code != 503:
        log.error("request %s failed", request.url.path, exc_info=exc)
    err_headers: dict[str, str] | None = getattr(err, "headers", None)
    return error_response(
        err.status_code, err.message, err.type, err.param, err.code, err_headers or None
    )
