"""Online load: batch-1 requests from N concurrent tritonclient (asyncio HTTP) clients.

Per concurrency level: requests/s, client-side p50/p99 latency, and the server's own queue vs
compute split from its statistics endpoint (the difference of two snapshots taken around the
level). With the engine dir too, the same command measures the engine offline (batch 32 through
a direct runner call) and a direct batch-1 call, so the dynamic batcher's recovery and the
serving overhead are ratios from one run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trtpipe.bench.stats import LatencyStats, ratio
from trtpipe.devices import cpu_cores
from trtpipe.errors import InputError

log = logging.getLogger(__name__)

TOKEN_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
PAYLOADS = 64  # distinct request bodies, cycled


class ServerTarget(Protocol):
    """What the readiness check needs of a bench's settings: the server and the model."""

    url: str
    model: str


@dataclass
class OnlineConfig:
    url: str
    model: str
    concurrency: list[int]
    max_requests: int = 1000
    duration_s: float = 10.0
    seq_len: int = 128
    outputs: list[str] | None = None
    engine_dir: Path | None = None
    threads: int | None = None
    runs: int = 10
    offline_batch: int = 32


def request_arrays(
    inputs: list[dict[str, Any]], seq_len: int, vocab: int, count: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``count`` distinct batch-1 requests: random token ids, full attention, zero type ids."""
    from trtpipe.engine import V2_TO_NUMPY

    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        arrays = {}
        for spec in inputs:
            name, datatype = spec["name"], spec["datatype"]
            if datatype not in V2_TO_NUMPY or name not in TOKEN_INPUTS:
                raise InputError(
                    f"input {name!r} ({datatype}) cannot be generated; the online bench sends "
                    f"token ids ({', '.join(sorted(TOKEN_INPUTS))})"
                )
            dtype = V2_TO_NUMPY[datatype]
            value: np.ndarray
            if name == "input_ids":
                value = rng.integers(3, vocab, size=(1, seq_len))
            elif name == "attention_mask":
                value = np.ones((1, seq_len))
            elif name == "position_ids":
                value = np.arange(seq_len)[None, :]
            else:
                value = np.zeros((1, seq_len))
            arrays[name] = value.astype(dtype)
        requests.append(arrays)
    return requests


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The server's queue/compute split for what happened between two statistics documents."""

    def stat(doc: dict[str, Any], key: str) -> tuple[int, int]:
        entry = doc.get("inference_stats", {}).get(key, {})
        return int(entry.get("count", 0)), int(entry.get("ns", 0))

    result: dict[str, Any] = {}
    count = stat(after, "success")[0] - stat(before, "success")[0]
    result["requests"] = count
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        n = stat(after, key)[0] - stat(before, key)[0]
        ns = stat(after, key)[1] - stat(before, key)[1]
        result[f"{key}_ms"] = ns / n / 1e6 if n else None
    parts = [result[f"{k}_ms"] for k in ("compute_input", "compute_infer", "compute_output")]
    result["compute_ms"] = sum(p for p in parts if p is not None) if any(parts) else None
    executions = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    inferences = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    result["executions"] = executions
    result["inferences"] = inferences
    result["average_batch_size"] = inferences / executions if executions else None
    return result


def _model_stats(document: Any, model: str) -> dict[str, Any]:
    for entry in (document or {}).get("model_stats", []):
        if entry.get("name") == model:
            return dict(entry)
    return {}


async def connect(client: Any, config: ServerTarget) -> dict[str, Any]:
    """The model's metadata, once the server answers and the model is ready and takes tensor
    requests; else InputError in one line, with the server's own reason where it gives one."""
    try:
        ready = await client.is_server_ready()
    except Exception as exc:  # aiohttp raises its own connection errors
        raise InputError(
            f"cannot reach a server at {config.url} ({type(exc).__name__}: {exc}); "
            "start one with trtpipe serve ENGINE_DIR"
        ) from exc
    if not ready:
        raise InputError(f"the server at {config.url} is not ready")
    if not await client.is_model_ready(config.model):
        raise InputError(await _why_not_ready(client, config))
    metadata: dict[str, Any] = await client.get_model_metadata(config.model)
    if _is_generation_model(metadata):  # ready and described, but v2 infer cannot run it
        raise InputError(_generation_model(config))
    return metadata


async def _why_not_ready(client: Any, config: ServerTarget) -> str:
    """The server's own reason (unknown name, a text-generation engine), said for this command."""
    from tritonclient.utils import InferenceServerException

    try:
        await client.get_model_metadata(config.model)
    except InferenceServerException as exc:
        reason = exc.message() or str(exc)
    else:
        return (
            f"model {config.model!r} on {config.url} is loaded but not ready (its devices are "
            "failing or it is still loading); see the serve log"
        )
    if "text-generation" in reason:
        return _generation_model(config)
    return f"model {config.model!r} is not served by {config.url}: {reason}"


def _generation_model(config: ServerTarget) -> str:
    return (
        f"model {config.model!r} on {config.url} is a text-generation engine; the online "
        "bench sends tensor requests to KServe v2 infer. Add --generate to benchmark its "
        "generation on the server"
    )


def _is_generation_model(metadata: dict[str, Any]) -> bool:
    """A served decoder: trtpipe's generation platform, or a text-generation task."""
    task = str((metadata.get("parameters") or {}).get("task", ""))
    return str(metadata.get("platform", "")).startswith("trtpipe_generation") or (
        "text-generation" in task
    )


async def _level(
    client: Any,
    config: OnlineConfig,
    concurrency: int,
    payloads: list[Any],
    outputs: list[Any],
) -> dict[str, Any]:
    from tritonclient.utils import InferenceServerException

    # Warm-up: one request per client, not counted, so connections exist before timing.
    # A refusal here is the request itself (shape, length): the same for every request.
    try:
        await asyncio.gather(
            *(
                client.infer(config.model, payloads[i % len(payloads)], outputs=outputs)
                for i in range(concurrency)
            )
        )
    except InferenceServerException as exc:
        reason = exc.message() or str(exc)
        raise InputError(
            f"{config.url} refused a request of {config.seq_len} tokens for model "
            f"{config.model!r}: {reason}"
            + ("; lower --seq-len" if "profile" in reason or "length" in reason else "")
        ) from exc
    before = _model_stats(await client.get_inference_statistics(config.model), config.model)
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + config.duration_s

    async def worker() -> None:
        nonlocal issued
        while issued < config.max_requests and time.perf_counter() < deadline:
            payload = payloads[issued % len(payloads)]
            issued += 1
            sent = time.perf_counter()
            try:
                await client.infer(config.model, payload, outputs=outputs)
            except InferenceServerException as exc:
                errors.append(str(exc))
                continue
            latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    after = _model_stats(await client.get_inference_statistics(config.model), config.model)
    if not latencies:
        raise InputError(
            f"every request failed at concurrency {concurrency}: {errors[0] if errors else '?'}"
        )
    level: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "latency_ms": LatencyStats.from_seconds(latencies).to_dict(),
        "server": stats_delta(before, after),
    }
    log.info(
        "concurrency %d: %.1f req/s, p50 %.2f ms, p99 %.2f ms, avg batch %s",
        concurrency,
        level["requests_per_s"],
        level["latency_ms"]["p50_ms"],
        level["latency_ms"]["p99_ms"],
        level["server"]["average_batch_size"],
    )
    return level


async def _sweep(config: OnlineConfig, vocab: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    try:
        import tritonclient.http.aio as triton_http
        from tritonclient.http import InferInput, InferRequestedOutput
    except ImportError as exc:
        raise InputError(
            f"the online bench needs tritonclient's HTTP client ({exc}); "
            "pip install 'tritonclient[http]'"
        ) from exc

    url = config.url.removeprefix("http://")
    client = triton_http.InferenceServerClient(url, conn_limit=max(config.concurrency) + 4)
    try:
        metadata = await connect(client, config)
        if _is_generation_model(metadata):
            raise InputError(_generation_model(config))
        arrays = request_arrays(metadata["inputs"], config.seq_len, vocab, PAYLOADS)
        datatypes = {spec["name"]: spec["datatype"] for spec in metadata["inputs"]}
        payloads = []
        for request in arrays:
            entries = []
            for name, value in request.items():
                entry = InferInput(name, list(value.shape), datatypes[name])
                entry.set_data_from_numpy(value, binary_data=True)
                entries.append(entry)
            payloads.append(entries)
        available = [spec["name"] for spec in metadata["outputs"]]
        wanted = config.outputs or available
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise InputError(f"--outputs {unknown} are not outputs of {config.model}: {available}")
        outputs = [InferRequestedOutput(name, binary_data=True) for name in wanted]
        levels = [await _level(client, config, c, payloads, outputs) for c in config.concurrency]
    finally:
        await client.close()
    return levels, metadata


def direct_figures(config: OnlineConfig, engine_dir: Path) -> dict[str, Any]:
    """The engine called directly: batch-1 latency and offline batch throughput."""
    from trtpipe.bench.common import default_device, engine_runner
    from trtpipe.compare import random_feeds, vocab_size
    from trtpipe.engine import EngineDir

    engine = EngineDir(engine_dir)
    runner = engine_runner(engine, default_device(engine.manifest), config.threads or cpu_cores())
    batch = min(config.offline_batch, engine.manifest.max_batch_size)
    with runner:
        vocab = vocab_size(engine.path)
        single = random_feeds(runner, 1, config.seq_len, vocab, 1)
        for _ in range(5):
            runner.infer(single)
        samples = []
        for _ in range(max(30, 5 * config.runs)):
            start = time.perf_counter()
            runner.infer(single)
            samples.append(time.perf_counter() - start)
        direct = LatencyStats.from_seconds(samples)
        feeds = random_feeds(runner, batch, config.seq_len, vocab, 2)
        for _ in range(2):
            runner.infer(feeds)
        batch_samples = []
        for _ in range(config.runs):
            start = time.perf_counter()
            runner.infer(feeds)
            batch_samples.append(time.perf_counter() - start)
    offline = LatencyStats.from_seconds(batch_samples)
    return {
        "engine": str(engine.path),
        "batch_size": batch,
        "seq_len": config.seq_len,
        "sequences_per_s": batch / (offline.median_ms / 1000.0),
        "batch_latency_ms": offline.to_dict(),
        "direct_p50_ms": direct.p50_ms,
        "direct_latency_ms": direct.to_dict(),
    }


def run_online(config: OnlineConfig) -> dict[str, Any]:
    """The concurrency sweep against a running server, plus the direct/offline comparison."""
    from trtpipe.bench.report import machine_info

    if config.max_requests < 1 or config.duration_s <= 0:
        raise InputError("--requests and --duration must be positive")
    vocab = 1000
    if config.engine_dir is not None:
        from trtpipe.compare import vocab_size
        from trtpipe.engine import EngineDir

        vocab = vocab_size(EngineDir(config.engine_dir).path)
    machine = machine_info()
    # uvloop, as the server: on a shared machine the load generator's CPU is the server's loss.
    from trtpipe.server.loop import run as run_loop

    levels, metadata = run_loop(_sweep(config, vocab))
    result: dict[str, Any] = {
        "url": config.url,
        "model": config.model,
        "seq_len": config.seq_len,
        "outputs": config.outputs or [spec["name"] for spec in metadata["outputs"]],
        "max_requests_per_level": config.max_requests,
        "max_seconds_per_level": config.duration_s,
        "levels": levels,
        "offline": None,
        "overhead_p50_ms": None,
    }
    if config.engine_dir is not None:
        offline = direct_figures(config, config.engine_dir)
        result["offline"] = offline
        for level in levels:
            level["offline_fraction"] = ratio(level["requests_per_s"], offline["sequences_per_s"])
        first = next((lv for lv in levels if lv["concurrency"] == 1), None)
        if first is not None:
            result["overhead_p50_ms"] = first["latency_ms"]["p50_ms"] - offline["direct_p50_ms"]
    return {"kind": "online", "machine": machine, "online": result}
