"""Text generation over HTTP: Triton-style ``/v2/models/{m}/generate`` (+ ``_stream`` SSE),
OpenAI ``/v1/completions`` and ``/v1/chat/completions`` (streaming and not).

Include it with ``app.include_router(generate_router({name: served}))``. Each request becomes
one or more sequences in a device's continuous-batching scheduler (``ServedGeneration``), so
concurrent requests share decode steps; a request the engine cannot run is refused before any
byte is sent (400), a full queue or a draining server gives 503, a request not admitted in time
504. A client that goes away (closed stream or connection) cancels its sequences, freeing
their batch rows at the next step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from trtpipe.errors import InputError
from trtpipe.generation.generator import Generator
from trtpipe.generation.sequence import Sequence, TokenEvent
from trtpipe.server import openai_generation as wire
from trtpipe.server.errors import unknown_generation_model
from trtpipe.server.generation_model import AsyncSink, ServedGeneration

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.25


class ClientGoneError(Exception):
    """The client closed the connection before its answer was ready."""


def error_response(exc: BaseException, openai: bool) -> JSONResponse:
    from trtpipe.server.errors import classify

    wire_error = classify(exc)
    status = wire_error.http_status
    if openai:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body: dict[str, Any] = {
            "error": {"message": wire_error.message, "type": kind, "param": None, "code": None}
        }
        return JSONResponse(body, status_code=status)
    return JSONResponse({"error": wire_error.message}, status_code=status)


def stream_error(exc: BaseException, openai: bool) -> dict[str, Any]:
    """An error after the stream started: one in-band event (the status line is sent)."""
    from trtpipe.server.errors import classify

    message = classify(exc).message
    return {"error": {"message": message, "type": "server_error"}} if openai else {"error": message}


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class Submitted:
    """The sequences of one request and the sink their events arrive on."""

    def __init__(self, seqs: list[Sequence], sink: AsyncSink, prompt_tokens: int):
        self.seqs, self.sink, self.prompt_tokens = seqs, sink, prompt_tokens

    def cancel(self) -> None:
        for seq in self.seqs:
            if seq.finish_reason is None:
                seq.cancel()

    @property
    def completion_tokens(self) -> int:
        return sum(len(seq.token_ids) for seq in self.seqs)

    async def collect(self, request: Request | None) -> list[list[TokenEvent]]:
        """Every event per sequence; cancels the sequences if the client disconnects."""
        events: list[list[TokenEvent]] = [[] for _ in self.seqs]
        watcher = None
        if request is not None:
            watcher = asyncio.create_task(self._watch(request))
        try:
            async for index, event in self.sink.events(len(self.seqs)):
                events[index].append(event)
        finally:
            if watcher is not None:
                watcher.cancel()
            self.cancel()
        return events

    async def _watch(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.cancel()
        self.sink.put_tagged(0, ClientGoneError("client disconnected"))


def sse_response(
    job: Submitted,
    render: Callable[[int, TokenEvent], bytes],
    openai: bool,
    head: dict[str, Any] | None = None,
    usage: bool = False,
    opening: bytes = b"",
) -> StreamingResponse:
    """Server-sent events for ``job``: every burst of token events written as one chunk, then
    (OpenAI) the usage chunk when asked for and ``[DONE]``; closing the stream cancels."""

    async def events() -> AsyncIterator[bytes]:
        try:
            if opening:
                yield opening
            async for burst in job.sink.bursts(len(job.seqs)):
                yield b"".join(render(index, event) for index, event in burst)
            if openai:
                if usage:
                    counts = wire.usage(job.prompt_tokens, job.completion_tokens)
                    yield sse({**(head or {}), "choices": [], "usage": counts})
                yield b"data: [DONE]\n\n"
        except Exception as exc:  # the stream has started: report in-band
            yield sse(stream_error(exc, openai))
        finally:
            job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def generate_router(
    models: Mapping[str, Any], missing: Callable[[str], Exception] | None = None
) -> APIRouter:
    """Routes for every decoder engine in ``models`` (name -> ServedGeneration; a loaded
    ``Generator`` is wrapped in one). A mapping of ServedGeneration is used live, not copied:
    the repository's models loaded or unloaded at run time are found (or not) at once.
    ``missing(name)``: the error for a name with no generation model (the repository's, which
    knows the server's other models); by default a 404 naming the generation models."""
    router = APIRouter()
    served: Mapping[str, Any] = models
    if any(isinstance(m, Generator) for m in models.values()):
        served = {
            name: ServedGeneration(m, name=name) if isinstance(m, Generator) else m
            for name, m in models.items()
        }
    router.served = served  # type: ignore[attr-defined]  # the app drains and closes them

    def missing_here(name: str) -> Exception:
        return unknown_generation_model(name, sorted(served))

    def find(name: Any) -> ServedGeneration:
        model = served.get(str(name))
        if model is None:
            raise (missing or missing_here)(str(name))
        return model  # type: ignore[no-any-return]

    def submit(
        model: ServedGeneration, prompt_ids: list[int], options: wire.GenerationOptions
    ) -> Submitted:
        sink = AsyncSink()
        seqs = model.submit(
            prompt_ids, options.params, sink, options.n, options.stop, options.logprobs
        )
        return Submitted(seqs, sink, len(prompt_ids))

    # -- Triton generate extension --------------------------------------------------------------
    async def triton_request(
        name: str, request: Request
    ) -> tuple[ServedGeneration, list[int], wire.GenerationOptions]:
        model = find(name)
        body = wire.parse_json(await request.body())
        prompt = body.get("text_input")
        if not isinstance(prompt, str):
            raise InputError('the request needs "text_input" (a string)')
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InputError('"parameters" must be a JSON object')
        values = {**body, **parameters}
        max_tokens = wire.max_tokens_of(values, ("max_tokens", "max_new_tokens"), 50)
        options = wire.options({**values, "n": 1, "logprobs": None}, max_tokens)
        return model, model.encode(prompt), options

    @router.post("/v2/models/{name}/generate")
    async def triton_generate(name: str, request: Request) -> Response:
        try:
            model, ids, options = await triton_request(name, request)
            job = submit(model, ids, options)
            await job.collect(request)
        except Exception as exc:
            return error_response(exc, openai=False)
        seq = job.seqs[0]
        return JSONResponse(
            {
                "model_name": name,
                "model_version": "1",
                "text_output": seq.text,
                "token_ids": seq.token_ids,
                "finish_reason": seq.finish_reason,
                "usage": wire.usage(job.prompt_tokens, job.completion_tokens),
            }
        )

    @router.post("/v2/models/{name}/generate_stream")
    async def triton_generate_stream(name: str, request: Request) -> Response:
        try:
            model, ids, options = await triton_request(name, request)
            job = submit(model, ids, options)
        except Exception as exc:
            return error_response(exc, openai=False)

        def render(_: int, event: TokenEvent) -> bytes:
            payload: dict[str, Any] = {
                "model_name": name,
                "model_version": "1",
                "text_output": event.text,
                "token_id": event.token_id,
            }
            if event.finish_reason is not None:
                payload["finish_reason"] = event.finish_reason
            return sse(payload)

        return sse_response(job, render, openai=False)

    # -- OpenAI ---------------------------------------------------------------------------------
    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = wire.parse_json(await request.body())
            model = find(body.get("model", ""))
            prompts = body.get("prompt")
            if isinstance(prompts, str):
                prompts = [prompts]
            if (
                not isinstance(prompts, list)
                or not prompts
                or not all(isinstance(p, str) for p in prompts)
            ):
                raise InputError('"prompt" must be a string or a list of strings')
            max_tokens = wire.max_tokens_of(body, ("max_tokens", "max_new_tokens"), 16)
            options = wire.options(body, max_tokens)
            if options.stream and len(prompts) != 1:
                raise InputError("streaming takes one prompt")
            ids = [model.encode(p) for p in prompts]
            jobs: list[Submitted] = []
            try:
                for row in ids:
                    jobs.append(submit(model, row, options))
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise
        except Exception as exc:
            return error_response(exc, openai=True)
        ident, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), str(body["model"])
        head = {"id": ident, "object": "text_completion", "created": created, "model": name}

        if not options.stream:
            try:
                gathered = await asyncio.gather(*(job.collect(request) for job in jobs))
            except Exception as exc:
                for job in jobs:
                    job.cancel()
                return error_response(exc, openai=True)
            choices = []
            for p, (job, per_seq) in enumerate(zip(jobs, gathered, strict=True)):
                for i, seq in enumerate(job.seqs):
                    logprobs = None
                    if options.logprobs is not None:
                        logprobs = wire.completion_logprobs(per_seq[i], model.token_text)
                    choices.append(
                        {
                            "text": seq.text,
                            "index": p * options.n + i,
                            "logprobs": logprobs,
                            "finish_reason": seq.finish_reason,
                        }
                    )
            prompt_tokens = sum(job.prompt_tokens for job in jobs)
            completion_tokens = sum(job.completion_tokens for job in jobs)
            return JSONResponse(
                {**head, "choices": choices, "usage": wire.usage(prompt_tokens, completion_tokens)}
            )

        job = jobs[0]
        offsets = [0] * options.n

        def render(index: int, event: TokenEvent) -> bytes:
            logprobs = None
            if options.logprobs is not None:
                logprobs = wire.completion_logprobs([event], model.token_text, offsets[index])
                offsets[index] += len(logprobs["tokens"][0])
            choice = {
                "text": event.text,
                "index": index,
                "logprobs": logprobs,
                "finish_reason": event.finish_reason,
            }
            return sse({**head, "choices": [choice]})

        return sse_response(job, render, openai=True, head=head, usage=options.include_usage)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = wire.parse_json(await request.body())
            model = find(body.get("model", ""))
            ids = model.chat_ids(wire.chat_messages(body.get("messages")))
            room = max(model.spec.max_total - len(ids), 1)
            max_tokens = wire.max_tokens_of(body, ("max_completion_tokens", "max_tokens"), room)
            options = wire.options(body, max_tokens, chat=True)
            job = submit(model, ids, options)
        except Exception as exc:
            return error_response(exc, openai=True)
        ident, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), str(body["model"])

        if not options.stream:
            head = {"id": ident, "object": "chat.completion", "created": created, "model": name}
            try:
                results = await job.collect(request)
            except Exception as exc:
                return error_response(exc, openai=True)
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": seq.text},
                    "logprobs": None
                    if options.logprobs is None
                    else wire.chat_logprobs(results[i], model.token_text),
                    "finish_reason": seq.finish_reason,
                }
                for i, seq in enumerate(job.seqs)
            ]
            counts = wire.usage(job.prompt_tokens, job.completion_tokens)
            return JSONResponse({**head, "choices": choices, "usage": counts})

        head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name}

        def chunk(index: int, delta: dict[str, Any], finish: str | None, lp: Any = None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return sse({**head, "choices": [choice]})

        def render(index: int, event: TokenEvent) -> bytes:
            out = b""
            logprobs = None
            if options.logprobs is not None:
                logprobs = wire.chat_logprobs([event], model.token_text)
            if event.text or logprobs is not None:
                out += chunk(index, {"content": event.text}, None, logprobs)
            if event.finish_reason is not None:
                out += chunk(index, {}, event.finish_reason)
            return out

        opening = b"".join(
            chunk(i, {"role": "assistant", "content": ""}, None) for i in range(len(job.seqs))
        )
        return sse_response(
            job, render, openai=True, head=head, usage=options.include_usage, opening=opening
        )

    return router
