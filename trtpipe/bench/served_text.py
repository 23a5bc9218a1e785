"""Served real text: batch-1 requests of real sentences against a running server, every reply
checked, beside the same engine's offline real-text figures from the same command.

Per protocol (OpenAI ``/v1/embeddings``, v2 ``text`` input and v2 token-id tensors over HTTP, the
same two over gRPC) and concurrency level, N closed-loop clients send one sentence each, in
corpus order. Each reply's sentence embedding is checked against the engine's own batch-1
result for that sentence. Offline references, measured in the bench process while the server
is idle (:mod:`trtpipe.bench.served_offline`): the engine's sorted real-text throughput (whole
corpus sorted by length), measured at the start and again after each protocol, and an
arrival-order figure (the corpus in order, batches of the concurrency, padded to their longest:
all a server can do with what has arrived). A protocol's levels are judged against the mean of
the sorted figures just before and after them, so that a machine whose speed drifts charges
both sides alike. The client's own CPU use is reported beside each level: on a 2-core machine
the load generator competes with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.bench.served_clients import CLIENTS, Client, client_for, grpc_client_name, http_url
from trtpipe.bench.served_offline import Batch1Seconds, Offline, direct_batch1, offline_engine
from trtpipe.bench.server_readings import cpu_split, read_server, server_split, server_stats
from trtpipe.bench.stats import LatencyStats, median, ratio
from trtpipe.devices import cpu_cores
from trtpipe.errors import InputError

log = logging.getLogger(__name__)

PROTOCOLS = tuple(CLIENTS)


@dataclass
class ServedTextConfig:
    url: str
    model: str
    texts: list[str]
    engine_dir: Path
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    protocols: list[str] = field(default_factory=lambda: ["openai"])
    grpc_url: str | None = None
    grpc_client: str = "auto"  # the bench's own zttp channel, or tritonclient's (see client_for)
    max_requests: int = 2000
    duration_s: float = 10.0
    c1_runs: int = 5
    offline_runs: int = 3
    threads: int | None = None
    # Sentences each c1 overhead run sends and calls directly, in alternating blocks.
    c1_direct_texts: int = 300
    c1_block: int = 100


def _offline_engine(
    config: ServedTextConfig,
) -> contextlib.AbstractContextManager[tuple[Offline, Callable[[], float], Batch1Seconds]]:
    """The engine loaded in this process for the whole command (:func:`offline_engine`)."""
    return offline_engine(
        config.engine_dir, config.texts, config.concurrency, config.threads, config.offline_runs
    )


def lone_launch_threads(stats: dict[str, Any]) -> int | None:
    """Intra-op threads a lone launch of the server's first CPU worker runs with, from its
    statistics document (``alone_threads``: workers sharing a wide session run a c1 request
    on all cores; servers before it report only ``threads``)."""
    for device in stats.get("devices", []):
        threads = device.get("alone_threads") or device.get("threads")
        if threads:
            return int(threads)
    return None


def agreement_floor(precision: str) -> float:
    """Cosine a reply must reach against the engine's batch-1 vector for its own sentence.

    fp32 replies differ only by padding and batch composition (~1e-6); int8 activations are
    quantized per batch, so a row moves a little with its neighbours. Another sentence's
    vector is far below either floor.
    """
    return 0.999 if precision in ("fp32", "fp16") else 0.98


async def _level(
    client: Client, config: ServedTextConfig, offline: Offline, concurrency: int
) -> dict[str, Any]:
    texts, count = config.texts, len(config.texts)
    floor = agreement_floor(offline.precision)
    try:  # warm connections
        await asyncio.gather(*(client.embed(i) for i in range(concurrency)))
    except Exception as exc:  # every client raises its own error types
        raise InputError(
            f"the first requests to {client.address} failed: {type(exc).__name__}: {exc}"
        ) from None
    stats_before, cpu_before = await read_server(config.url, config.model)
    latencies: list[float] = []
    wrong: list[int] = []
    errors: list[str] = []
    issued = 0
    cpu0, start = time.process_time(), time.perf_counter()
    deadline = start + config.duration_s

    async def worker() -> None:
        nonlocal issued
        while issued < config.max_requests and time.perf_counter() < deadline:
            index = issued % count
            issued += 1
            try:
                seconds, agrees = await _send(client, index, offline, floor)
            except Exception as exc:  # every client raises its own error types
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(seconds)
            if not agrees:
                wrong.append(index)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    client_cpu_s = time.process_time() - cpu0
    client_cpu = client_cpu_s / elapsed
    stats_after, cpu_after = await read_server(config.url, config.model)
    server = server_split(stats_before, stats_after, elapsed)
    server.update(cpu_split(cpu_before, cpu_after, len(latencies)))
    if not latencies:
        raise InputError(f"every request failed ({errors[0] if errors else '?'})")
    rate = len(latencies) / elapsed
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wrong_replies": len(wrong),
        "requests_per_s": rate,
        "latency_ms": LatencyStats.from_seconds(latencies).to_dict(),
        "of_offline_sorted_at_start": ratio(rate, offline.sorted_per_s),
        "of_offline_arrival": ratio(rate, offline.arrival_per_s.get(concurrency, 0.0)),
        "client_cpu_share": client_cpu / (os.cpu_count() or 1),
        # At c1 all of it lies on the requests' path or right beside it, on the same cores.
        "client_cpu_us_per_request": 1e6 * client_cpu_s / len(latencies),
        "texts": len(texts),
        "issued": issued,
        "server": server,
    }


async def _c1_level(
    client: Client, config: ServedTextConfig, offline: Offline, offline_batch1: Batch1Seconds | None
) -> dict[str, Any]:
    """The c1 level, then its overhead over a direct batch-1 call in ``c1_runs`` runs. A run
    sends ``c1_direct_texts`` sentences one at a time and calls the engine directly on the
    same sentences, alternating blocks of ``c1_block`` (well under a second each), so that a
    machine whose speed drifts charges both sides alike; the overhead is the median of the
    runs' differences of p50. The direct calls run on the command's offline engine
    (``offline_batch1``) where it has the server's lone-launch threads (or runs on a GPU), so
    that a large engine is not loaded twice; else on a copy loaded with those threads."""
    threads = (
        config.threads
        or lone_launch_threads(await server_stats(config.url, config.model))
        or cpu_cores()
    )
    level = await _level(client, config, offline, 1)
    runs = []
    engine: contextlib.AbstractContextManager[Batch1Seconds]
    if offline_batch1 is not None and offline.threads in (0, threads):
        engine = contextlib.nullcontext(offline_batch1)
    else:
        engine = direct_batch1(config.engine_dir, offline.ids, offline.pad_id, threads)
    with engine as direct_seconds:
        count, size = len(config.texts), max(1, config.c1_direct_texts)
        await asyncio.to_thread(direct_seconds, list(range(min(count, 10))))  # warm-up
        for run in range(config.c1_runs):
            indices = [(run * size + i) % count for i in range(size)]
            runs.append(await _c1_pairs(client, config, offline, direct_seconds, indices))
    served = [r["served_p50_ms"] for r in runs]
    direct = [r["direct_p50_ms"] for r in runs]
    level["p50_ms_runs"] = served
    level["direct_p50_ms_runs"] = direct
    level["direct_threads"] = threads
    level["direct_block"] = config.c1_block
    level["overhead_p50_ms_runs"] = [s - d for s, d in zip(served, direct, strict=True)]
    level["overhead_p50_ms"] = median(level["overhead_p50_ms_runs"])
    level["overhead_requests"] = sum(r["requests"] for r in runs)
    level["wrong_replies"] += sum(r["wrong"] for r in runs)
    level["errors"] += sum(r["errors"] for r in runs)
    return level


async def _c1_pairs(
    client: Client,
    config: ServedTextConfig,
    offline: Offline,
    direct_seconds: Callable[[list[int]], list[float]],
    indices: list[int],
) -> dict[str, Any]:
    """One overhead run: blocks of served requests, each followed by the same sentences
    called directly."""
    floor = agreement_floor(offline.precision)
    served: list[float] = []
    direct: list[float] = []
    wrong = errors = 0
    size = max(1, config.c1_block)
    for start in range(0, len(indices), size):
        block = indices[start : start + size]
        for index in block:
            try:
                seconds, agrees = await _send(client, index, offline, floor)
            except Exception:  # every client raises its own error types
                errors += 1
                continue
            served.append(seconds)
            wrong += not agrees
        direct.extend(await asyncio.to_thread(direct_seconds, block))
    if not served:
        raise InputError("every c1 overhead request failed")
    return {
        "served_p50_ms": LatencyStats.from_seconds(served).p50_ms,
        "direct_p50_ms": LatencyStats.from_seconds(direct).p50_ms,
        "requests": len(served),
        "wrong": wrong,
        "errors": errors,
    }


async def _send(client: Client, index: int, offline: Offline, floor: float) -> tuple[float, bool]:
    """One request, timed: its seconds, and whether the reply is its own sentence's vector.
    Raises what the client raises."""
    sent = time.perf_counter()
    vector = await client.embed(index)
    return time.perf_counter() - sent, _agrees(vector, offline.vectors[index], floor)


def _agrees(vector: np.ndarray, expected: np.ndarray, floor: float) -> bool:
    """Whether a reply's vector is its own sentence's: cosine at least ``floor``."""
    norms = max(float(np.linalg.norm(vector) * np.linalg.norm(expected)), 1e-12)
    return float(np.dot(vector, expected)) / norms >= floor


async def _ensure_ready(config: ServedTextConfig) -> None:
    """The online bench's readiness check (server answers, model ready, tensor requests)."""
    import tritonclient.http.aio as triton_http

    from trtpipe.bench.online import connect

    client = triton_http.InferenceServerClient(http_url(config.url).split("://", 1)[1])
    try:
        await connect(client, config)
    finally:
        await client.close()


async def _protocol(
    protocol: str,
    config: ServedTextConfig,
    offline: Offline,
    offline_batch1: Batch1Seconds | None = None,
) -> dict[str, Any]:
    """Every level of one protocol (``offline_batch1``: the offline engine's direct batch-1
    calls, for the c1 overhead; None loads the engine again for them)."""
    client = client_for(protocol, config, offline.ids, offline.inputs)
    await client.open()
    try:
        levels = []
        for concurrency in config.concurrency:
            if concurrency == 1 and config.c1_runs > 1:
                level = await _c1_level(client, config, offline, offline_batch1)
            else:
                level = await _level(client, config, offline, concurrency)
            levels.append(level)
            log.info(
                "%s c%d: %.1f req/s (%.0f%% of offline at the start), wrong %d, client CPU %.0f%%, "
                "event loop %s us/request",
                protocol,
                concurrency,
                level["requests_per_s"],
                100 * (level["of_offline_sorted_at_start"] or 0),
                level["wrong_replies"],
                100 * level["client_cpu_share"],
                _micros(level["server"].get("loop_cpu_us_per_request")),
            )
        return {"protocol": protocol, "client": client.name, "levels": levels}
    finally:
        await client.close()


def run_served_text(config: ServedTextConfig) -> dict[str, Any]:
    """Offline references first (server idle), then every protocol and level."""
    from trtpipe.bench.report import machine_info

    unknown = sorted(set(config.protocols) - set(PROTOCOLS))
    if unknown:
        raise InputError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    if any(p.startswith("grpc") for p in config.protocols) and not config.grpc_url:
        raise InputError("gRPC protocols need --grpc-url HOST:PORT")
    if config.max_requests < 1 or config.duration_s <= 0:
        raise InputError("--requests and --duration must be positive")
    config.grpc_client = grpc_client_name(config.grpc_client)
    # uvloop, as the server: on a shared machine the load generator's CPU is the server's loss.
    from trtpipe.server.loop import run as run_loop

    run_loop(_ensure_ready(config))  # before a minute of offline figures
    protocols = []
    with _offline_engine(config) as (offline, sorted_rate, batch1_seconds):
        checkpoints = [offline.sorted_per_s]
        for protocol in config.protocols:
            result = run_loop(_protocol(protocol, config, offline, batch1_seconds))
            checkpoints.append(sorted_rate())
            protocols.append(_judged(result, checkpoints[-2], checkpoints[-1]))
    return {
        "kind": "served_text",
        "machine": machine_info(),
        "served_text": {
            "url": config.url,
            "model": config.model,
            "texts": len(config.texts),
            "mean_tokens": float(np.mean([len(t) for t in offline.ids])),
            "offline": {
                "sorted_sentences_per_s": offline.sorted_per_s,
                "sorted_sentences_per_s_checkpoints": checkpoints,
                "threads": offline.threads,
                "sorted_ms_per_sentence": offline.sorted_ms_per_sentence,
                "arrival_sentences_per_s": offline.arrival_per_s,
                "direct_batch1_p50_ms": offline.direct_p50_ms,
                "precision": offline.precision,
            },
            "protocols": protocols,
        },
    }


def _judged(result: dict[str, Any], before: float, after: float) -> dict[str, Any]:
    """A protocol's levels as shares of the offline sorted figure of the minutes they ran in:
    the mean of those measured just before and after them."""
    reference = (before + after) / 2
    result["offline_sorted_before_after"] = [before, after]
    for level in result["levels"]:
        level["of_offline_sorted"] = ratio(level["requests_per_s"], reference)
    return result


def served_text_table(data: dict[str, Any]) -> str:
    offline = data["offline"]
    lines = [
        f"served real text: {data['model']} ({offline['precision']}), {data['texts']} sentences, "
        f"mean {data['mean_tokens']:.1f} tokens",
        f"offline, same engine and sentences: sorted {offline['sorted_sentences_per_s']:.1f}/s"
        + _after_each_protocol(offline)
        + f", batch-1 p50 {offline['direct_batch1_p50_ms']:.2f} ms"
        + _sorted_cost(offline),
        _clients(data["protocols"]),
        f"{'protocol':<12} {'conc':>4} {'req/s':>8} {'% sorted':>9} {'% arrival':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'wrong':>6} {'errors':>6} {'client CPU':>10} "
        f"{'avg batch':>9} {'padding':>7} {'engine busy':>11} {'srv us/req':>10} "
        f"{'loop us/req':>11} {'queue ms':>8} {'engine ms/req':>13}",
    ]
    for proto in data["protocols"]:
        for level in proto["levels"]:
            lines.append(
                f"{proto['protocol']:<12} {level['concurrency']:>4} "
                f"{level['requests_per_s']:>8.1f} {_pct(level['of_offline_sorted']):>9} "
                f"{_pct(level['of_offline_arrival']):>10} "
                f"{level['latency_ms']['p50_ms']:>8.2f} {level['latency_ms']['p99_ms']:>8.2f} "
                f"{level['wrong_replies']:>6} {level['errors']:>6} "
                f"{_pct(level['client_cpu_share']):>10} "
                f"{_batch(level.get('server', {}).get('average_batch_size')):>9} "
                f"{_pct(level.get('server', {}).get('padding_share')):>7} "
                f"{_pct(level.get('server', {}).get('engine_busy_share')):>11} "
                f"{_micros(level.get('server', {}).get('server_cpu_us_per_request')):>10} "
                f"{_micros(level.get('server', {}).get('loop_cpu_us_per_request')):>11} "
                f"{_millis(level.get('server', {}).get('queue_ms')):>8} "
                f"{_millis(level.get('server', {}).get('engine_ms_per_request')):>13}"
            )
            if "overhead_p50_ms" in level:
                runs = ", ".join(f"{v:.2f}" for v in level["overhead_p50_ms_runs"])
                direct = ", ".join(f"{v:.2f}" for v in level.get("direct_p50_ms_runs", []))
                when = (
                    f"in blocks of {level['direct_block']} between the served requests"
                    if "direct_block" in level
                    else "right after each run"
                )
                lines.append(
                    f"{'':<17} c1 p50 overhead over a direct batch-1 call: "
                    f"{level['overhead_p50_ms']:.2f} ms (median of {runs}; direct p50 "
                    f"{direct} ms {when}, {level.get('direct_threads', '?')} "
                    "thread(s) like one server worker)" + _client_cost(level)
                )
    workers = {
        level.get("server", {}).get("workers")
        for proto in data["protocols"]
        for level in proto["levels"]
    } - {None}
    if workers:
        lines.append(
            "engine busy: the share of the wall time a worker's engine ran, the mean over the "
            f"model's {'/'.join(str(n) for n in sorted(workers))} worker(s)"
        )
    if "sorted_sentences_per_s_checkpoints" in offline:
        lines.append(
            "% sorted: of the mean of the offline sorted figures measured just before and after "
            "the protocol's levels"
        )
    lines.append(
        "srv / loop us/req: the server's CPU per answered request, all of it (engine included) "
        "and its event loop thread's alone (the front end's Python), from its /metrics"
    )
    lines.append(
        "queue ms: a request's mean wait in the batcher; engine ms/req: the workers' time in the "
        "engine per request, summed over workers (beside the offline sorted run's above)"
    )
    return "\n".join(lines)


def _clients(protocols: list[dict[str, Any]]) -> str:
    """Which client spoke each protocol (JSON files before the choice existed say nothing)."""
    named = {p["protocol"]: p["client"] for p in protocols if "client" in p}
    if not named:
        return "clients: (not recorded)"
    return "clients: " + ", ".join(f"{protocol} {client}" for protocol, client in named.items())


def _client_cost(level: dict[str, Any]) -> str:
    """The bench's own CPU per request at that level: the overhead counts the client's time."""
    cost = level.get("client_cpu_us_per_request")
    return "" if cost is None else f"; this client's CPU {cost:.0f} us per request"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _micros(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _millis(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _after_each_protocol(offline: dict[str, Any]) -> str:
    """The sorted figures measured again after each protocol (absent from older JSON files)."""
    later = offline.get("sorted_sentences_per_s_checkpoints", [])[1:]
    if not later:
        return ""
    return " at the start, then " + " / ".join(f"{v:.1f}" for v in later) + " after each protocol"


def _sorted_cost(offline: dict[str, Any]) -> str:
    """The offline sorted run's thread time per sentence (absent from older JSON files)."""
    cost, threads = offline.get("sorted_ms_per_sentence"), offline.get("threads")
    if not cost or not threads:
        return ""
    return f", sorted {cost:.2f} ms per sentence on {threads} thread(s)"


def _batch(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
