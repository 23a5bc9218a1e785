"""Served generation: tokens/s, TTFT and inter-token latency at several concurrency levels,
beside the same engine's offline batched tokens/s measured in the same command.

Each of ``c`` clients sends streaming ``/v1/completions`` requests one after another (a closed
loop), greedy with EOS ignored, so every request generates exactly ``max_new_tokens`` tokens
and the served figure compares like for like with the offline ``Generator`` at batch 1 and at
batch ``c_max``. TTFT is measured from sending the request to its first token event;
inter-token latency between consecutive token events of one request.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trtpipe.errors import InputError


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def _one_request(client: Any, url: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    """(start time, arrival time of every token event) of one streamed completion."""
    start = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:300]
            raise InputError(f"{url} answered {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            if line.startswith('data: {"id"') and '"usage"' not in line:
                arrivals.append(time.perf_counter())
            elif line.startswith('data: {"error"'):
                raise InputError(f"{url} failed mid-stream: {line[6:300]}")
    return start, arrivals


async def _level(
    url: str, model: str, prompts: Sequence[str], concurrency: int, per_client: int, tokens: int
) -> dict[str, Any]:
    import httpx

    endpoint = url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=concurrency + 4)
    timeout = httpx.Timeout(300.0)
    records: list[tuple[float, list[float]]] = []

    async def client_loop(client: httpx.AsyncClient, number: int, count: int) -> None:
        for j in range(count):
            body = {
                "model": model,
                "prompt": prompts[(number * per_client + j) % len(prompts)],
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            records.append(await _one_request(client, endpoint, body))

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(client_loop(client, i, 1) for i in range(concurrency)))  # warm-up
        records.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, i, per_client) for i in range(concurrency)))
        wall = time.perf_counter() - start
    generated = sum(len(arrivals) for _, arrivals in records)
    ttft = [arrivals[0] - begin for begin, arrivals in records if arrivals]
    itl = [b - a for _, arrivals in records for a, b in itertools.pairwise(arrivals)]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 2)

    return {
        "concurrency": concurrency,
        "requests": len(records),
        "generated_tokens": generated,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(generated / wall, 1) if wall > 0 else 0.0,
        "ttft_ms_p50": ms(percentile(ttft, 50)),
        "ttft_ms_p99": ms(percentile(ttft, 99)),
        "itl_ms_p50": ms(percentile(itl, 50)),
        "itl_ms_p99": ms(percentile(itl, 99)),
    }


def benchmark_served_generation(
    url: str,
    model: str,
    engine_dir: str | Path | None,
    prompts: Sequence[str],
    concurrency: Sequence[int] = (1, 4, 16),
    max_new_tokens: int = 64,
    requests: int = 48,
    runs: int = 3,
) -> dict[str, Any]:
    """Served levels and (with ``engine_dir``) the offline batch-1 and batch-max figures.

    The offline side runs in this process while the server idles, so both sides see the same
    machine; run the server with one device, as the offline side uses one.
    """
    if not prompts:
        raise InputError("no prompts to send")
    if not url.startswith("http"):
        url = "http://" + url

    def offline_rates() -> dict[str, float]:
        from trtpipe.generation.bench import benchmark_generation

        assert engine_dir is not None
        rates: dict[str, float] = {}
        for batch in sorted({1, max(concurrency)}):
            sample = [prompts[i % len(prompts)] for i in range(max(batch, 4))]
            result = benchmark_generation(engine_dir, sample, batch, max_new_tokens, runs=runs)
            rates[f"batch_{batch}"] = float(result["tokens_per_s"])
        return rates

    # Offline before and after the served levels (the server idles meanwhile): on a shared
    # machine the two show how much the load drifted; the ratio uses their mean.
    before = offline_rates() if engine_dir is not None else {}
    from trtpipe.server.loop import run as run_loop  # uvloop, as the other served benches

    levels = [
        run_loop(_level(url, model, prompts, c, max(1, -(-requests // c)), max_new_tokens))
        for c in concurrency
    ]
    after = offline_rates() if engine_dir is not None else {}
    offline = {key: (before[key] + after[key]) / 2 for key in before}
    for level in levels:
        reference = offline.get(f"batch_{level['concurrency']}")
        if reference:
            level["pct_of_offline_same_batch"] = round(100 * level["tokens_per_s"] / reference, 1)
    return {
        "url": url,
        "model": model,
        "max_new_tokens": max_new_tokens,
        "requests_per_level": requests,
        "levels": levels,
        "offline_tokens_per_s": {key: round(value, 1) for key, value in offline.items()},
        "offline_before_after": {key: [before[key], after[key]] for key in before},
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The levels as a markdown table (the offline figures in the last column)."""
    rows = [
        "| concurrency | tokens/s | % of offline same batch | TTFT p50 / p99 ms "
        "| inter-token p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for level in result["levels"]:
        pct = level.get("pct_of_offline_same_batch")
        rows.append(
            f"| c{level['concurrency']} | {level['tokens_per_s']:.0f} "
            f"| {'' if pct is None else f'{pct:.0f}%'} "
            f"| {level['ttft_ms_p50']} / {level['ttft_ms_p99']} "
            f"| {level['itl_ms_p50']} / {level['itl_ms_p99']} |"
        )
    offline = ", ".join(f"{k}: {v:.0f} tok/s" for k, v in result["offline_tokens_per_s"].items())
    if offline:
        rows.append("")
        rows.append(f"Offline (same engine, same command): {offline}.")
    return "\n".join(rows)


def run_from_options(options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``trtpipe bench --url URL --generate --model M [--engine-dir DIR]``: (result, table)."""
    from trtpipe.bench.common import parse_int_list
    from trtpipe.text import read_texts, sample_texts

    if not options.get("model"):
        raise InputError("--url --generate needs --model NAME (the generation model's name)")

    def given(name: str) -> bool:  # the online mode's defaults do not fit generation
        import click
        from click.core import ParameterSource

        ctx = click.get_current_context(silent=True)
        return ctx is not None and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE

    prompts_file = options.get("prompts_file")
    prompts = read_texts(prompts_file) if prompts_file else sample_texts()
    levels = options["concurrency"] if given("concurrency") else "1,4,16"
    result = benchmark_served_generation(
        options["url"],
        options["model"],
        options.get("served_engine"),
        prompts,
        parse_int_list(levels, "--concurrency"),
        options.get("max_new_tokens") or 64,
        options["max_requests"] if given("max_requests") else 48,
    )
    return result, markdown_table(result)
