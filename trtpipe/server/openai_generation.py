"""Request fields -> generation parameters, and results -> OpenAI / Triton response documents.

Kept apart from the routes so each has one job: this module knows the wire formats
(completions, chat completions, logprobs, usage), the routes know the request lifecycle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trtpipe.errors import InputError
from trtpipe.generation.sampling import SamplingParams
from trtpipe.generation.sequence import TokenEvent, stop_strings

MAX_BODY = 1 << 20
MAX_N = 16
MAX_LOGPROBS = 20


@dataclass
class GenerationOptions:
    """Everything a generation request asks for besides its prompt."""

    params: SamplingParams
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-n per token; None = no logprobs
    stream: bool = False
    include_usage: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def whole_number(value: Any, name: str) -> int:
    """An integer field: ints (and integral numbers) only, so 2.5 tokens is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{name!r} must be an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{name!r} must be an integer, got {value!r}") from None
    if not number.is_integer():
        raise InputError(f"{name!r} must be an integer, got {value!r}")
    return int(number)


def sampling_params(values: Mapping[str, Any], max_tokens: int) -> SamplingParams:
    """Request fields -> validated SamplingParams (InputError names the bad field)."""

    def get(key: str, default: Any) -> Any:  # null means the default, as OpenAI has it
        value = values.get(key)
        return default if value is None else value

    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            greedy=bool(get("greedy", False)),
            temperature=float(get("temperature", 1.0)),
            top_k=whole_number(get("top_k", 0), "top_k"),
            top_p=float(get("top_p", 1.0)),
            seed=None if values.get("seed") is None else whole_number(values["seed"], "seed"),
            ignore_eos=bool(get("ignore_eos", False)),
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad generation parameter: {exc}") from exc
    return params.validate()


def max_tokens_of(values: Mapping[str, Any], keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        if values.get(key) is not None:
            return whole_number(values[key], key)
    return default


def options(values: Mapping[str, Any], max_tokens: int, chat: bool = False) -> GenerationOptions:
    """n, stop, logprobs, stream and sampling fields of an OpenAI request."""
    value = 1 if values.get("n") is None else values["n"]
    try:
        n = whole_number(value, "n")
    except InputError:
        n = 0
    if not 1 <= n <= MAX_N:
        raise InputError(
            f'"n" must be an integer from 1 to {MAX_N} (default "n": 1), got {value!r}'
        )
    logprobs: int | None = None
    if chat:
        if values.get("logprobs"):
            top = values.get("top_logprobs")
            logprobs = 0 if top is None else whole_number(top, "top_logprobs")
    elif values.get("logprobs") is not None:
        logprobs = whole_number(values["logprobs"], "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InputError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}")
    stream_options = values.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise InputError('"stream_options" must be a JSON object')
    return GenerationOptions(
        params=sampling_params(values, max_tokens),
        n=n,
        stop=stop_strings(values.get("stop")),
        logprobs=logprobs,
        stream=bool(values.get("stream", False)),
        include_usage=bool(stream_options.get("include_usage", False)),
    )


def parse_json(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY:
        raise InputError(f"request body of {len(body)} bytes exceeds {MAX_BODY}")
    try:
        data = json.loads(body or b"{}")
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON object")
    return data


def chat_messages(value: Any) -> list[dict[str, str]]:
    """OpenAI messages -> [{role, content}] with text content (text parts are joined)."""
    if not isinstance(value, list) or not value:
        raise InputError('"messages" must be a non-empty list of {"role", "content"} objects')
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(f'messages[{i}] needs a string "role"')
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise InputError(f"messages[{i}]: only text content parts are supported")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string or text parts")
        messages.append({"role": message["role"], "content": content})
    return messages


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    events: list[TokenEvent], token_text: Any, offset: int = 0
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for ``events``."""
    tokens = [token_text(e.token_id) for e in events]
    offsets = []
    position = offset
    for text in tokens:
        offsets.append(position)
        position += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in events],
        "top_logprobs": [top_by_text(e.top_logprobs or [], token_text) for e in events],
        "text_offset": offsets,
    }


def top_by_text(top: list[tuple[int, float]], token_text: Any) -> dict[str, float]:
    """Best-first alternatives keyed by text; ids that decode alike keep the best value."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(token_text(token), logprob)
    return out


def chat_logprobs(events: list[TokenEvent], token_text: Any) -> dict[str, Any]:
    """The chat completions ``logprobs`` object: one entry per token with its alternatives."""

    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {
                **entry(e.token_id, e.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in (e.top_logprobs or [])],
            }
            for e in events
        ]
    }
