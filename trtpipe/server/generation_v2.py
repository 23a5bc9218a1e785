"""Text generation over KServe v2 infer, as Triton's TensorRT-LLM backend takes it.

A generation model answers ``/v2/models/{m}/infer`` and gRPC ``ModelInfer`` with the
TensorRT-LLM "ensemble" tensors: ``text_input`` (BYTES, one row per prompt) and ``max_tokens``
in, ``text_output`` (BYTES, the completion) out, with the optional sampling inputs listed in
``INPUTS``. Each ``text_input`` row becomes its own sequence in the continuous-batching
scheduler and the replies come back in row order. With ``stream`` true, gRPC
``ModelStreamInfer`` sends one response per generated token (``stream_outputs``), the last one
flagged with the ``triton_final_response`` parameter, as Triton does for decoupled models.

Sampling follows TensorRT-LLM: greedy unless ``top_k`` > 0 or ``top_p`` > 0 is given
(``top_p`` 0 means off); ``temperature`` scales a sampled request (0 is greedy). This module
only knows the tensors; the request lifecycle (sinks, cancellation) is ``generate_routes``'.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtpipe.server import openai_generation as wire
from trtpipe.server.generate_routes import Submitted
from trtpipe.server.generation_model import AsyncSink, ServedGeneration
from trtpipe.server.generation_tensors import INPUTS, OUTPUT
from trtpipe.server.grpc_codec import decode_request, encode_response
from trtpipe.server.protocol import InferRequest, InputTensor, ProtocolError, select_outputs

KIND_NAMES = {"O": "BYTES", "iu": "an integer type", "fiu": "a number type", "b": "BOOL"}
# Request parameters a client library sets on its own; anything else must be an input name.
RESERVED_PARAMETERS = frozenset(
    {
        "binary_data_output",
        "triton_enable_empty_final_response",
        "priority",
        "timeout",
        "sequence_id",
        "sequence_start",
        "sequence_end",
    }
)
REFUSED = {
    "bad_words": "bad_words is not supported (no per-token logit masking); leave it out",
    "beam_width": "beam search is not supported; beam_width must be 1",
}
MAX_STOP_WORDS = 16


@dataclass
class Row:
    """One ``text_input`` row: its prompt ids, options and the text put before the output."""

    ids: list[int]
    options: wire.GenerationOptions
    echo: str = ""


@dataclass
class V2Generation:
    rows: list[Row]
    stream: bool
    shape: list[int]  # of text_input; text_output has it too


def parse(model: ServedGeneration, request: InferRequest) -> V2Generation:
    """The rows and options of a v2 request; ProtocolError/InputError name what is wrong."""
    given = {t.name: t for t in request.inputs}
    for name in given:
        if name not in INPUTS and name in REFUSED:
            raise ProtocolError(REFUSED[name])
        if name not in INPUTS:
            raise ProtocolError(f"unknown input {name!r}; {model.name!r} takes {sorted(INPUTS)}")
    extra = {k: v for k, v in request.parameters.items() if k not in RESERVED_PARAMETERS}
    for key in extra:
        if key not in INPUTS or key in ("text_input", "stop_words"):
            raise ProtocolError(
                f"unknown request parameter {key!r}; give generation options as input tensors "
                f"(or parameters) named {sorted(set(INPUTS) - {'text_input', 'stop_words'})}"
            )
        if key in given:
            raise ProtocolError(f"{key!r} is given both as an input and as a parameter")
    text = given.get("text_input")
    if text is None:
        raise ProtocolError('the request needs the "text_input" input (BYTES, shape [1, 1])')
    check_kind(text)
    shape = list(text.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise ProtocolError(
            f"text_input has shape {shape}; send one prompt per row: [rows, 1] or [rows]"
        )
    count = shape[0]
    limit = max((s.max_batch for s in model.schedulers), default=1)
    if count > limit:
        raise ProtocolError(f"text_input has {count} rows; this model takes at most {limit}")
    columns: dict[str, list[Any]] = {}
    for name, tensor in given.items():
        if name not in ("text_input", "stop_words"):
            check_kind(tensor)
            columns[name] = per_row(tensor, count)
    for key, value in extra.items():
        columns[key] = [value] * count
    stream = columns.pop("stream", [False])
    if len(set(bool(s) for s in stream)) != 1:
        raise ProtocolError("stream must be one value for the whole request")
    stops = stop_words(given.get("stop_words"), count)
    prompts = [utf8(item, "text_input") for item in text.data.reshape(-1)]
    rows = [
        row(model, prompts[i], {k: v[i] for k, v in columns.items()}, stops[i])
        for i in range(count)
    ]
    return V2Generation(rows, bool(stream[0]), shape)


def check_kind(tensor: InputTensor) -> None:
    kind = INPUTS[tensor.name][1]
    if tensor.data.dtype.kind not in kind:
        raise ProtocolError(
            f"input {tensor.name!r} must be {KIND_NAMES[kind]} (as {INPUTS[tensor.name][0]}), "
            f"got {tensor.datatype}"
        )


def per_row(tensor: InputTensor, count: int) -> list[Any]:
    """One value for every row, or one per row."""
    flat = tensor.data.reshape(-1)
    if flat.size == 1:
        return [flat[0].item()] * count
    if flat.size == count:
        return [v.item() for v in flat]
    raise ProtocolError(
        f"input {tensor.name!r} has {flat.size} values for {count} text_input rows; "
        "send one value, or one per row"
    )


def utf8(item: Any, name: str) -> str:
    try:
        return item.decode("utf-8") if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError:
        raise ProtocolError(f"{name} must be UTF-8 text") from None


def stop_words(tensor: InputTensor | None, count: int) -> list[tuple[str, ...]]:
    """Stop strings per row: a [rows, n] tensor gives each row its own, any other shape gives
    every row all of them; empty strings (padding) are dropped."""
    if tensor is None:
        return [()] * count
    check_kind(tensor)
    data = tensor.data
    if data.ndim == 2 and data.shape[0] == count and count > 1:
        groups = [list(data[i]) for i in range(count)]
    else:
        groups = [list(data.reshape(-1))] * count
    out = []
    for group in groups:
        words = tuple(w for w in (utf8(v, "stop_words") for v in group) if w)
        if len(words) > MAX_STOP_WORDS:
            raise ProtocolError(f"stop_words holds {len(words)} words; at most {MAX_STOP_WORDS}")
        out.append(words)
    return out


def row(model: ServedGeneration, prompt: str, values: dict[str, Any], stop: tuple[str, ...]) -> Row:
    if values.get("max_tokens") is None:
        raise ProtocolError('the request needs "max_tokens" (INT32, shape [1, 1])')
    if values.get("beam_width", 1) != 1:
        raise ProtocolError(REFUSED["beam_width"])
    if "seed" in values and "random_seed" in values:
        raise ProtocolError('give "random_seed" or "seed", not both')
    top_k, top_p = values.get("top_k"), values.get("top_p")
    top_p = None if top_p == 0 else top_p  # TensorRT-LLM: 0 is off
    sampled = bool(top_k) or top_p is not None
    fields = {
        "greedy": not sampled,
        "temperature": values.get("temperature"),
        "top_k": top_k,
        "top_p": top_p,
        "seed": values.get("random_seed", values.get("seed")),
        "ignore_eos": values.get("ignore_eos"),
    }
    max_tokens = wire.whole_number(values["max_tokens"], "max_tokens")
    params = wire.sampling_params(fields, max_tokens)
    end_id = values.get("end_id")
    if end_id is not None:
        if int(end_id) < 0:
            raise ProtocolError(f"end_id must be a token id >= 0, got {end_id}")
        params = dataclasses.replace(params, stop_token_ids=[int(end_id)])
    echo = "" if values.get("exclude_input_in_output", True) else prompt
    options = wire.GenerationOptions(params=params, stop=stop)
    return Row(model.encode(prompt), options, echo)


def submit(model: ServedGeneration, generation: V2Generation) -> list[Submitted]:
    """One sequence per row, all queued or none (a refusal cancels those already queued)."""
    jobs: list[Submitted] = []
    try:
        for item in generation.rows:
            sink = AsyncSink()
            seqs = model.submit(item.ids, item.options.params, sink, 1, item.options.stop)
            jobs.append(Submitted(seqs, sink, len(item.ids)))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    return jobs


def text_output(texts: list[str], shape: list[int]) -> dict[str, np.ndarray]:
    array = np.empty(len(texts), dtype=object)
    array[:] = [t.encode("utf-8") for t in texts]
    return {OUTPUT: array.reshape(shape)}


async def complete(
    model: ServedGeneration, request: InferRequest, http_request: Any = None
) -> dict[str, np.ndarray]:
    """The whole completion of every row (non-streaming infer); ``http_request`` (a Starlette
    request) cancels the sequences when its client disconnects."""
    generation = parse(model, request)
    if generation.stream:
        raise ProtocolError(
            "stream=true needs gRPC ModelStreamInfer (or POST /v2/models/"
            f"{model.name}/generate_stream); set stream to false for infer"
        )
    return await run_to_end(model, generation, http_request)


async def run_to_end(
    model: ServedGeneration, generation: V2Generation, http_request: Any = None
) -> dict[str, np.ndarray]:
    jobs = submit(model, generation)
    try:
        await asyncio.gather(*(job.collect(http_request) for job in jobs))
    finally:
        for job in jobs:
            job.cancel()
    texts = [item.echo + job.seqs[0].text for item, job in zip(generation.rows, jobs, strict=True)]
    return text_output(texts, generation.shape)


async def stream_outputs(
    model: ServedGeneration, request: InferRequest
) -> AsyncGenerator[tuple[dict[str, np.ndarray], bool], None]:
    """(outputs, final) per response of a ModelStreamInfer request: one per token when
    ``stream`` is true (one row only), else one with the whole text. Closing the iterator
    early (the client went away) cancels the sequence."""
    generation = parse(model, request)
    if not generation.stream:
        yield await run_to_end(model, generation), True
        return
    if len(generation.rows) != 1:
        raise ProtocolError(
            f"stream=true takes one text_input row, got {len(generation.rows)}; send each "
            "prompt as its own request on the stream"
        )
    (job,) = submit(model, generation)
    echo = generation.rows[0].echo
    try:
        async for burst in job.sink.bursts(1):
            for _, event in burst:
                piece, echo = echo + event.text, ""
                yield text_output([piece], generation.shape), event.finish_reason is not None
    finally:
        job.cancel()


def no_shared_outputs(request: InferRequest) -> None:
    if any(o.shared_memory is not None for o in request.outputs or ()):
        raise ProtocolError("text_output cannot be written to shared memory; leave it in the reply")


async def http_infer(
    model: ServedGeneration,
    body: bytes,
    header_length: str | None,
    shared_memory: Any = None,
    http_request: Any = None,
) -> tuple[bytes, int | None]:
    """``POST /v2/models/{m}/infer`` of a generation model: the reply body and its
    Inference-Header-Content-Length (None when all JSON)."""
    from trtpipe.server.protocol import encode_http_response, parse_http_request, select_outputs

    request = parse_http_request(body, header_length, shared_memory)
    no_shared_outputs(request)
    produced = await complete(model, request, http_request)
    selected = select_outputs(produced, request.outputs, request.binary_default)
    return encode_http_response(model.name, model.version, request.id, selected)


def grpc_request(request: Any, shared_memory: Any = None) -> InferRequest:
    decoded = decode_request(request, shared_memory)
    no_shared_outputs(decoded)
    return decoded


def grpc_response(
    model: ServedGeneration, request: InferRequest, produced: dict[str, np.ndarray]
) -> Any:
    selected = select_outputs(produced, request.outputs, True)
    return encode_response(model.name, model.version, request.id, selected)


async def grpc_infer(model: ServedGeneration, request: Any, shared_memory: Any = None) -> Any:
    """gRPC ``ModelInfer`` of a generation model (the whole text at once)."""
    decoded = grpc_request(request, shared_memory)
    return grpc_response(model, decoded, await complete(model, decoded))


async def grpc_stream(
    model: ServedGeneration, request: Any, shared_memory: Any = None
) -> AsyncIterator[Any]:
    """The ModelInferResponses of one ModelStreamInfer request, each flagged with
    ``triton_final_response`` (true on the last), as Triton flags decoupled responses."""
    decoded = grpc_request(request, shared_memory)
    outputs = stream_outputs(model, decoded)
    try:
        async for produced, final in outputs:
            response = grpc_response(model, decoded, produced)
            response.parameters["triton_final_response"].bool_param = final
            yield response
    finally:
        await outputs.aclose()
