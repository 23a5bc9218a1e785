"""What a served bench reads off the server around each level: its statistics and its CPU.

The model's statistics document (Triton's format) says what the batcher and the engine did:
launches, their size and padding, the engines' busy time, the queue wait. The server's
``/metrics`` says what its CPU did: the whole process and the event loop thread alone. Both are
read in one HTTP session before and after a level, and the differences are put per request.
"""

from __future__ import annotations

from typing import Any

from trtpipe.bench.served_clients import http_url

PROCESS_CPU = "process_cpu_seconds_total"  # prometheus-client's standard process metric


async def server_stats(url: str, model: str) -> dict[str, Any]:
    """The model's statistics document, read over HTTP (empty if the server has none)."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        return await _stats(session, http_url(url), model)


async def read_server(url: str, model: str) -> tuple[dict[str, Any], dict[str, float]]:
    """The model's statistics and the server's CPU seconds, in one HTTP session."""
    import aiohttp

    base = http_url(url)
    async with aiohttp.ClientSession() as session:
        return await _stats(session, base, model), await _cpu(session, base)


async def _stats(session: Any, url: str, model: str) -> dict[str, Any]:
    from trtpipe.bench.online import _model_stats

    async with session.get(f"{url}/v2/models/{model}/stats") as response:
        return _model_stats(await response.json(), model) if response.ok else {}


async def _cpu(session: Any, url: str) -> dict[str, float]:
    """The process's and the event loop's CPU seconds off /metrics (empty for a server that
    exports neither)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    from trtpipe.server.metrics import LOOP_CPU

    try:
        async with session.get(f"{url}/metrics") as response:
            if not response.ok:
                return {}
            text = await response.text()
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    except (aiohttp.ClientError, ValueError):
        return {}
    wanted = {PROCESS_CPU: "process", f"{LOOP_CPU}_total": "loop"}
    return {wanted[s.name]: float(s.value) for s in samples if s.name in wanted}


def cpu_split(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Server CPU per answered request over a level, in microseconds: all of the process
    (engine included) and the event loop thread alone (the front end's Python). On a CPU
    server both share the cores with the engine, so this is what the front end costs under
    load, not on an idle machine."""
    names = {"process": "server_cpu_us_per_request", "loop": "loop_cpu_us_per_request"}
    return {
        name: (after[key] - before[key]) / requests * 1e6
        for key, name in names.items()
        if requests and key in before and key in after
    }


def server_split(before: dict[str, Any], after: dict[str, Any], elapsed: float) -> dict[str, Any]:
    """What the server did between two statistics documents: launches, their average size and
    the share of the wall time the engine was running, averaged over the model's workers (0 to
    1 however many there are), which says whether a gap is the engine's (busy near 1) or the
    front end's (the engines wait).

    Where the engines are busy, ``engine_ms_per_request`` (the workers' time inside the engine
    per answered request, summed over workers) says why: set beside the offline sorted run's
    time per sentence (its threads x 1 / its rate), it is the price of the launches the server
    could form from what had arrived (their fixed cost, their padding, the cores shared with
    the front end). ``queue_ms`` is a request's mean wait in the batcher's queue."""

    from trtpipe.bench.online import stats_delta

    def engine_ns(doc: dict[str, Any]) -> int:  # inside runner.infer, on the device threads
        return sum(int(d.get("compute_ns", 0)) for d in doc.get("devices", []))

    if not before or not after:
        return {}
    launches = stats_delta(before, after)
    inferences = launches["inferences"]
    busy_ns = engine_ns(after) - engine_ns(before)
    workers = max(1, len(after.get("devices", [])))
    tokens = {
        key: after.get("tokens", {}).get(key, 0) - before.get("tokens", {}).get(key, 0)
        for key in ("real", "padding")
    }
    launched = tokens["real"] + tokens["padding"]
    return {
        "padding_share": tokens["padding"] / launched if launched else None,
        "launches": launches["executions"],
        "average_batch_size": launches["average_batch_size"],
        "workers": workers,
        "engine_busy_share": busy_ns / 1e9 / elapsed / workers if elapsed > 0 else None,
        "engine_ms_per_request": busy_ns / 1e6 / inferences if inferences > 0 else None,
        "queue_ms": launches["queue_ms"],
        "launch_overhead_positions": after.get("launch_overhead_positions"),
    }
