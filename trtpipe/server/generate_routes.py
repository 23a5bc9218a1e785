"""Text generation over HTTP: Triton-style ``/v2/models/{m}/generate`` (+ ``_stream`` SSE)
and OpenAI ``/v1/completions`` (streaming and not), over ``Generator`` objects.

Include it in the server app with ``app.include_router(generate_router({name: generator}))``.
Generation runs in worker threads (each request holds one device for its duration), so the
event loop keeps serving; every stream has its own decode loop and so its own tokens.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Generator as Stream
from collections.abc import Iterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from trtpipe.errors import InputError, TrtpipeError
from trtpipe.generation.generator import Generator
from trtpipe.generation.sampling import SamplingParams

MAX_BODY = 1 << 20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sampling_params(values: Mapping[str, Any], max_tokens_key: str, default_max: int) -> Any:
    """Request fields -> validated SamplingParams (InputError names the bad field)."""
    max_tokens = values.get(max_tokens_key)
    if max_tokens is None:
        max_tokens = values.get("max_new_tokens", default_max)
    try:
        temperature = float(values.get("temperature", 1.0))
        params = SamplingParams(
            max_new_tokens=whole_number(max_tokens, max_tokens_key),
            greedy=bool(values.get("greedy", False)),
            temperature=temperature,
            top_k=whole_number(values.get("top_k", 0), "top_k"),
            top_p=float(values.get("top_p", 1.0)),
            seed=None if values.get("seed") is None else whole_number(values["seed"], "seed"),
            ignore_eos=bool(values.get("ignore_eos", False)),
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad generation parameter: {exc}") from exc
    return params.validate()


def whole_number(value: Any, field: str) -> int:
    """An integer field: ints (and integral numbers) only, so 2.5 tokens is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{field!r} must be an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{field!r} must be an integer, got {value!r}") from None
    if not number.is_integer():
        raise InputError(f"{field!r} must be an integer, got {value!r}")
    return int(number)


async def json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise InputError(f"request body of {len(body)} bytes exceeds {MAX_BODY}")
    try:
        data = json.loads(body or b"{}")
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON object")
    return data


def error_response(exc: Exception, openai: bool) -> JSONResponse:
    status = 400 if isinstance(exc, InputError) else 500
    message = str(exc) if isinstance(exc, TrtpipeError) else f"generation failed: {exc}"
    if openai:
        kind = "invalid_request_error" if status == 400 else "server_error"
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": None}}
        return JSONResponse(body, status_code=status)
    return JSONResponse({"error": message}, status_code=status)


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def open_stream(
    generator: Generator, prompt: str, params: SamplingParams
) -> tuple[Stream[tuple[str, Any], None, None], tuple[str, Any] | None]:
    """Start a stream and take its first piece in a worker thread, so bad requests fail
    with a status code before any bytes are sent."""
    stream = generator.stream_tokens(prompt, params)
    first = await run_in_threadpool(next, stream, None)
    return stream, first


def generate_router(generators: Mapping[str, Generator]) -> APIRouter:
    """Routes for every decoder engine in ``generators`` (model name -> loaded Generator)."""
    router = APIRouter()

    def find(name: str) -> Generator:
        generator = generators.get(name)
        if generator is None:
            raise InputError(
                f"unknown generation model {name!r}; models: {sorted(generators) or 'none'}"
            )
        return generator

    # -- Triton generate extension --------------------------------------------------------------
    async def triton_request(name: str, request: Request) -> tuple[Generator, str, Any]:
        generator = find(name)
        body = await json_body(request)
        prompt = body.get("text_input")
        if not isinstance(prompt, str):
            raise InputError('the request needs "text_input" (a string)')
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InputError('"parameters" must be a JSON object')
        values = {**body, **parameters}
        return generator, prompt, sampling_params(values, "max_tokens", 50)

    @router.post("/v2/models/{name}/generate")
    async def triton_generate(name: str, request: Request) -> Response:
        try:
            generator, prompt, params = await triton_request(name, request)
            result = (await run_in_threadpool(generator.generate, [prompt], params))[0]
        except Exception as exc:
            return error_response(exc, openai=False)
        return JSONResponse(
            {
                "model_name": name,
                "model_version": "1",
                "text_output": result.text,
                "token_ids": result.token_ids,
                "finish_reason": result.finish_reason,
            }
        )

    @router.post("/v2/models/{name}/generate_stream")
    async def triton_generate_stream(name: str, request: Request) -> Response:
        try:
            generator, prompt, params = await triton_request(name, request)
            stream, first = await open_stream(generator, prompt, params)
        except Exception as exc:
            return error_response(exc, openai=False)

        def events() -> Iterator[str]:
            try:
                item = first
                while item is not None:
                    piece, result = item
                    done = result.finish_reason == "stop" or len(result.token_ids) >= (
                        params.max_new_tokens
                    )
                    payload = {"model_name": name, "model_version": "1", "text_output": piece}
                    payload["token_id"] = result.token_ids[-1]
                    if done:
                        payload["finish_reason"] = result.finish_reason
                    yield sse(payload)
                    item = next(stream, None)
            finally:
                stream.close()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # -- OpenAI completions ---------------------------------------------------------------------
    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = await json_body(request)
            generator = find(str(body.get("model", "")))
            prompts = body.get("prompt")
            if isinstance(prompts, str):
                prompts = [prompts]
            if (
                not isinstance(prompts, list)
                or not prompts
                or not all(isinstance(p, str) for p in prompts)
            ):
                raise InputError('"prompt" must be a string or a list of strings')
            if body.get("n", 1) not in (1, None):
                raise InputError('only "n": 1 is supported')
            params = sampling_params(body, "max_tokens", 16)
            stream = bool(body.get("stream", False))
            if stream and len(prompts) != 1:
                raise InputError("streaming takes one prompt")
        except Exception as exc:
            return error_response(exc, openai=True)
        ident = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = str(body["model"])
        if not stream:
            try:
                results = await run_in_threadpool(generator.generate, prompts, params)
            except Exception as exc:
                return error_response(exc, openai=True)
            completion_tokens = sum(len(r.token_ids) for r in results)
            prompt_tokens = sum(r.prompt_tokens for r in results)
            choices = [
                {"text": r.text, "index": i, "logprobs": None, "finish_reason": r.finish_reason}
                for i, r in enumerate(results)
            ]
            return JSONResponse(
                {
                    "id": ident,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": choices,
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                }
            )
        try:
            token_stream, first = await open_stream(generator, prompts[0], params)
        except Exception as exc:
            return error_response(exc, openai=True)

        def chunk(text: str, finish: str | None) -> str:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
            return sse(
                {
                    "id": ident,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                }
            )

        def events() -> Iterator[str]:
            finish = "length"
            try:
                item = first
                while item is not None:
                    piece, result = item
                    finish = result.finish_reason
                    if piece:
                        yield chunk(piece, None)
                    item = next(token_stream, None)
            finally:
                token_stream.close()
            yield chunk("", finish)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    return router
