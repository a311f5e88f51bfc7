"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}, with `param`
naming the offending field wherever one is to blame."""
from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def param_of(message: str) -> str | None:
    """Our ValueErrors start with the offending field: 'temperature: must be ...', 'messages.0.content: ...'."""
    head = message.split(":", 1)[0]
    return head if head and all(part.isidentifier() or part.isdigit() for part in head.split(".")) else None


def invalid_request(errors: list[dict]) -> APIError:
    """pydantic's most specific complaint (the deepest field) as an OpenAI 400 naming the field."""
    first = max(errors, key=lambda e: len(_field_path(e))) if errors else {}
    param = ".".join(_field_path(first)) or None
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    msg = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    return APIError(400, msg, param=param)


def _field_path(error: dict) -> list[str]:
    """The field an error is about, without the union members pydantic names on the way
    ('messages.0.content.list[ContentPart].0.text' -> messages.0.content.0.text)."""
    def union_member(part) -> bool:
        return isinstance(part, str) and ("[" in part or part.startswith("constrained-")
                                          or part in ("str", "int", "float", "bool", "list", "dict"))

    return [str(x) for x in error.get("loc", ()) if x != "body" and not union_member(x)]


def call(fn):
    """fn(), its ValueError (whose message starts with the field, as SamplingParams' do) made a 400."""
    try:
        return fn()
    except ValueError as e:
        raise APIError(400, str(e), param=param_of(str(e))) from e
