"""Every failure as OpenAI's nested error object: {"error": {message, type, param, code}}, or on
Anthropic's routes (/v1/messages...) as Anthropic's: {"type": "error", "error": {type, message}}.

Validation problems are 400 (never FastAPI's 422); unknown routes 404; anything unexpected a 500
with the same shape, so a client never has to parse a traceback.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

logger = logging.getLogger("quantserve.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "internal_error", 503: "service_unavailable"}
ANTHROPIC_PATHS = "/v1/messages"        # this prefix answers in Anthropic's shape
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                   413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
                   529: "overloaded_error"}
ANTHROPIC_PARAMS = {"stop": "stop_sequences"}      # OpenAI field names in shared checks -> Anthropic's


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def anthropic_body(self) -> dict:
        return anthropic_error_body(anthropic_status(self.status, self.code), self.message, self.param)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def anthropic_status(status: int, code: str | None) -> int:
    """A full queue is Anthropic's 529 overloaded_error (OpenAI's routes say 429)."""
    return 529 if code == "overloaded" else status


def anthropic_error_body(status: int, message: str, param: str | None = None) -> dict:
    if param and not message.startswith(f"{param}:"):      # Anthropic has no `param`: the message names it
        message = f"{ANTHROPIC_PARAMS.get(param, param)}: {message}"
    kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def shaped_error_body(path: str | None, status: int, message: str, param: str | None = None,
                      code: str | None = None) -> tuple[int, dict]:
    """(status, body) in the shape of the API that `path` belongs to."""
    if path is not None and path.startswith(ANTHROPIC_PATHS):
        status = anthropic_status(status, code)
        return status, anthropic_error_body(status, message, param)
    return status, error_body(status, message, param, code)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, path: str | None = None) -> JSONResponse:
    status, body = shaped_error_body(path, status, message, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(exc) -> tuple[str, str | None]:
    """The most specific problem of a RequestValidationError or pydantic ValidationError (the
    deepest: a block of unknown type inside `content: str | list[...]`, not "content is not a
    string"), phrased for a person, and the field it is about."""
    def path(err) -> list[str]:
        return [str(p) for p in err.get("loc", ()) if p != "body" and not _union_tag(p)]

    err = max(exc.errors(), key=lambda e: len(path(e)))
    loc = path(err)
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
    if err.get("type") == "missing" and not loc:
        return "the request needs a JSON body", None
    msg = err["msg"].removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def _union_tag(part) -> bool:
    """pydantic names the union member it tried ('str', "literal['a']", 'function-after[...]')."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or any(c in part for c in "[(-"))


def allowed_methods(request: Request) -> str:
    """Every method served at this path: Starlette's 405 names only the first matching route's,
    wrong where one path has several routes (GET and DELETE /v1/responses/{id})."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param, "invalid_value", path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return error_response(exc.status_code, str(exc.detail), None, None, headers, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", path=request.url.path)
