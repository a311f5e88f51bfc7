"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}, with `param`
naming the offending field wherever one is to blame."""
from __future__ import annotations

import logging
import re

logger = logging.getLogger("kvserve.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        """Anthropic's shape: {"type": "error", "error": {"type", "message"}}, its type by the status."""
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                                           "message": self.message}}

    def log(self, request_id: str, method: str, path: str) -> None:
        """A refusal's why in the log (its type, code and field; not its message, which may quote
        the body), so that an operator sees why a client fails."""
        if 400 <= self.status < 500:
            logger.info("request %s: %s %s -> %d %s%s%s", request_id, method, _printable(path, 128), self.status,
                        self.type, f" code={_printable(self.code)}" if self.code else "",
                        f" param={_printable(self.param)}" if self.param else "")

    def response_for(self, path: str) -> tuple[int, dict]:
        """The status and body for a request to `path`: Anthropic's routes answer in Anthropic's
        shape and codes (an overloaded server is 529 there), the others in OpenAI's."""
        if is_anthropic(path):
            return (529 if self.status == 503 else self.status), self.anthropic_body()
        return self.status, self.body()


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 503: "overloaded_error"}


def _printable(text: str, limit: int = 64) -> str:
    """A client-given name made safe for a log line: printable ASCII, bounded."""
    text = re.sub(r"[^\x21-\x7e]", "?", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


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
        why = VLLM_FIELDS_NOT_SERVED.get(param or "")
        if why is not None:
            return APIError(400, f"{param}: vLLM's field, not supported by this server: {why}", param=param)
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    msg = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    return APIError(400, msg, param=param)


# Fields of vLLM's completion and chat requests that this server refuses, and why (README's table
# lists what it implements); each is a 400 naming it, never dropped.
VLLM_FIELDS_NOT_SERVED = {
    "cache_salt": "the prefix cache is shared by every request; start with --no-enable-prefix-caching to share none",
    "kv_transfer_params": "no disaggregated prefill (KV connectors)",
    "ec_transfer_params": "no disaggregated encoders",
    "vllm_xargs": "no custom logits processors to read them",
    "logits_processors": "no per-request logits processors (vLLM V1 has none either)",
    "return_token_ids": "not yet: the token ids are in the logprobs (return_tokens_as_token_ids)",
    "return_prompt_text": "not yet: POST /tokenize renders a conversation",
    "return_weight_versions": "weights are not updated while serving",
    "return_token_offsets": "only vLLM's /render endpoints have it",
    "logprob_token_ids": "not yet: top_logprobs gives the most likely tokens",
    "truncation_side": "prompts are truncated on the left (the last truncate_prompt_tokens are kept)",
    "thinking_token_budget": "not yet: max_tokens bounds thinking and answer together",
    "include_reasoning": "not yet: with a reasoning parser the thinking is returned as reasoning_content",
    "repetition_detection": "not yet: repetition_penalty and frequency_penalty discourage repeats",
    "stream_interval": "every step's new tokens are sent at once",
    "session_id": "no session affinity: one engine serves every request",
    "prompt_embeds": "prompts are text or token ids",
    "mm_processor_kwargs": "text-only models", "media_io_kwargs": "text-only models",
    "mm_payload": "text-only models", "return_mm_kwargs": "text-only models",
    "watermarking": "no watermarking", "routed_experts_prompt_start": "routed experts are not returned",
    "guided_whitespace_pattern": "JSON is compact, without whitespace between tokens",
    "structural_tag": "give it inside structured_outputs or response_format",
}


def _field_path(error: dict) -> list[str]:
    """The field an error is about, without the union members pydantic names on the way
    ('messages.0.content.list[ContentPart].0.text' -> messages.0.content.0.text), tagged ones
    included: our discriminated unions tag their members `kind=name` ('input.0.item=message.role')."""
    def union_member(part) -> bool:
        return isinstance(part, str) and ("[" in part or "=" in part or part.startswith("constrained-")
                                          or part in ("str", "int", "float", "bool", "list", "dict"))

    return [str(x) for x in error.get("loc", ()) if x != "body" and not union_member(x)]


def call(fn):
    """fn(), its ValueError (whose message starts with the field, as SamplingParams' do) made a 400."""
    try:
        return fn()
    except ValueError as e:
        raise APIError(400, str(e), param=param_of(str(e))) from e


def renamed(error: APIError, names: dict[str, str]) -> APIError:
    """An error about the chat request that runs another protocol's request, naming the field the
    user set (`names`: chat's field -> theirs). A chat message's index is not theirs: an error
    about `messages.3.content` names theirs whole."""
    if error.param is None:
        return error
    head, _, rest = error.param.partition(".")
    if head not in names:
        return error
    param = names[head] if head == "messages" else ".".join(filter(None, (names[head], rest)))
    message = error.message.replace(error.param, param, 1)
    return APIError(error.status, message, error.type, param, error.code, error.headers)
