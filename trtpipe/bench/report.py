"""Terminal tables, the JSON file (every figure plus the machine) and the PNG plot."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from trtpipe.devices import cpu_cores
from trtpipe.inspect import table

NOISY = 1.25  # runs of one side further apart than this are flagged as a busy machine
LIBRARIES = (
    "trtpipe",
    "numpy",
    "torch",
    "transformers",
    "onnxruntime-gpu",
    "onnxruntime",
    "tensorrt",
    "cuda-python",
    "tokenizers",
    "tritonclient",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """Names of the visible CUDA GPUs (empty without a driver)."""
    from trtpipe.devices import cuda_device_count

    count = cuda_device_count()
    if not count:
        return []
    from cuda.bindings import runtime as cudart

    names = []
    for index in range(count):
        err, props = cudart.cudaGetDeviceProperties(index)
        if int(err) == 0:
            raw = props.name
            names.append(
                raw.decode(errors="replace").rstrip("\x00") if isinstance(raw, bytes) else str(raw)
            )
    return names


def machine_info() -> dict[str, Any]:
    """The machine and library versions, so every figure says where it came from."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": cpu_cores(),
        "gpus": gpu_names(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": load,
        "versions": versions,
    }


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fixed_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "batch",
        "seq",
        "engine seq/s",
        "tok/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "torch seq/s",
        "torch p50 ms",
        "speedup",
    ]
    body = []
    for row in rows:
        eng, base = row["engine"], row["baseline"]
        body.append(
            [
                str(row["batch_size"]),
                str(row["seq_len"]),
                _f(eng["sequences_per_s"]),
                _f(eng["tokens_per_s"], 0),
                _f(eng["latency_ms"]["p50_ms"], 2),
                _f(eng["latency_ms"]["p90_ms"], 2),
                _f(eng["latency_ms"]["p99_ms"], 2),
                _f(base["sequences_per_s"]) if base else "-",
                _f(base["latency_ms"]["p50_ms"], 2) if base else "-",
                _x(row["speedup"]),
            ]
        )
    return table(body, header)


def text_table(result: dict[str, Any]) -> str:
    header = ["side", "sentences/s", "seconds", "batches", "padding", "recipe"]
    sides = [("trtpipe", result["engine"]), ("torch", result["baseline"])]
    sides += list(result.get("other_baselines", {}).items())
    body = [
        [
            name,
            _f(side["sentences_per_s"]),
            _f(side["seconds_median"], 2),
            str(side["batches"]),
            f"{100 * side['padding_ratio']:.0f}%",
            side["recipe"],
        ]
        for name, side in sides
        if side
    ]
    lines = [table(body, header), f"{result['texts']} texts; speedup {_x(result['speedup'])}"]
    for name, side in sides:
        if side and len(side["seconds_runs"]) > 1:
            low, high = min(side["seconds_runs"]), max(side["seconds_runs"])
            if high > NOISY * low:
                lines.append(
                    f"warning: {name} passes took {low:.1f}-{high:.1f} s ({high / low:.1f}x "
                    "apart): the machine was busy; the median is reported, rerun when idle"
                )
    for name, side in result.get("other_baselines", {}).items():
        lines.append(f"engine vs {name}: {_x(side['engine_speedup'])}")
    return "\n".join(lines)


def scaling_table(result: dict[str, Any]) -> str:
    header = ["devices", "threads/worker", "seq/s", "speed-up", "efficiency"]
    body = [
        [
            ",".join(row["devices"]),
            str(row["threads_per_worker"] or "-"),
            _f(row["sequences_per_s"]),
            _x(row["speedup"]),
            "-" if row["efficiency"] is None else f"{100 * row['efficiency']:.0f}%",
        ]
        for row in result["rows"]
    ]
    return table(body, header) + (
        f"\n{result['batches']} batches of {result['batch_size']} x {result['seq_len']} per run"
    )


def online_table(result: dict[str, Any]) -> str:
    header = [
        "concurrency",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "queue ms",
        "compute ms",
        "avg batch",
        "vs offline",
    ]
    body = [
        [
            str(level["concurrency"]),
            _f(level["requests_per_s"]),
            _f(level["latency_ms"]["p50_ms"], 2),
            _f(level["latency_ms"]["p99_ms"], 2),
            str(level["errors"]),
            _f(level["server"].get("queue_ms"), 2),
            _f(level["server"].get("compute_ms"), 2),
            _f(level["server"].get("average_batch_size"), 1),
            "-"
            if level.get("offline_fraction") is None
            else f"{100 * level['offline_fraction']:.0f}%",
        ]
        for level in result["levels"]
    ]
    lines = [table(body, header)]
    offline = result.get("offline")
    if offline:
        lines.append(
            f"offline batch {offline['batch_size']} x {offline['seq_len']}: "
            f"{offline['sequences_per_s']:.1f} seq/s; direct batch-1 call p50 "
            f"{offline['direct_p50_ms']:.2f} ms"
        )
    if result.get("overhead_p50_ms") is not None:
        lines.append(
            f"concurrency-1 p50 overhead over a direct call: {result['overhead_p50_ms']:.2f} ms"
        )
    return "\n".join(lines)


def generation_table(result: dict[str, Any]) -> str:
    header = [
        "batch",
        "engine tok/s",
        "HF tok/s",
        "speedup",
        "engine TTFT p50 ms",
        "HF TTFT p50 ms",
        "tokens = HF",
    ]
    body = [
        [
            str(row["batch_size"]),
            _f(row["engine_tokens_per_s"]),
            _f(row["baseline_tokens_per_s"]),
            _x(row["speedup"]),
            _f(row["engine"]["ttft_ms_p50"], 1),
            _f((row.get("baseline") or {}).get("ttft_ms_p50"), 1),
            _agreement(row.get("token_agreement")),
        ]
        for row in result["rows"]
    ]
    return table(body, header) + (
        f"\n{result['prompts']} prompts, {result['max_new_tokens']} new tokens each (greedy)"
    )


def _agreement(tokens: dict[str, Any] | None) -> str:
    if not tokens:
        return "-"
    if tokens["match"]:
        return "yes"
    return f"no ({100 * tokens['fraction']:.0f}% equal)"


def gate_line(gate: dict[str, Any]) -> str:
    return f"accuracy gate: {gate['status']} ({gate['source']})"


def write_plot(path: Path, report: dict[str, Any]) -> None:
    """Throughput bars, engine vs PyTorch, one panel per benchmark that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        key for key in ("fixed", "text", "scaling", "online", "generation") if report.get(key)
    ]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    engine_label = _engine_label(report)
    for ax, key in zip(axes[0], panels, strict=True):
        globals()[f"_plot_{key}"](ax, report[key], engine_label)
        ax.set_ylim(bottom=0)
    machine = report.get("machine", {})
    name = report.get("engine", {}).get("name") or report.get("online", {}).get("model", "")
    fig.suptitle(
        f"{name}  |  {machine.get('cpu', '')}, "
        f"{machine.get('cores', '?')} cores  |  {machine.get('date', '')[:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _engine_label(report: dict[str, Any]) -> str:
    engine = report.get("engine", {})
    return f"trtpipe {engine.get('backend', '')} {engine.get('precision', '')}".strip()


def _bars(ax: Any, labels: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def _plot_fixed(ax: Any, rows: list[dict[str, Any]], engine_label: str) -> None:
    labels = [f"{r['batch_size']}x{r['seq_len']}" for r in rows]
    series = {engine_label: [r["engine"]["sequences_per_s"] for r in rows]}
    if all(r["baseline"] for r in rows):
        series["PyTorch eager"] = [r["baseline"]["sequences_per_s"] for r in rows]
    _bars(ax, labels, series, "sequences/s")
    ax.set_title("fixed shapes (batch x seq)", fontsize=10)


def _plot_text(ax: Any, result: dict[str, Any], engine_label: str) -> None:
    names = [engine_label]
    values = [result["engine"]["sentences_per_s"]]
    if result["baseline"]:
        names.append("PyTorch recipe")
        values.append(result["baseline"]["sentences_per_s"])
    for name, side in result.get("other_baselines", {}).items():
        names.append(name.replace("_", " "))
        values.append(side["sentences_per_s"])
    bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_ylabel("sentences/s")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"real text, end to end ({result['texts']} texts)", fontsize=10)


def _plot_scaling(ax: Any, result: dict[str, Any], engine_label: str) -> None:
    counts = [row["count"] for row in result["rows"]]
    values = [row["sequences_per_s"] for row in result["rows"]]
    ax.plot(counts, values, marker="o", label=engine_label)
    ideal = [values[0] * c / counts[0] for c in counts]
    ax.plot(counts, ideal, linestyle="--", color="gray", label="linear")
    ax.set_xlabel("devices")
    ax.set_ylabel("sequences/s")
    ax.set_xticks(counts)
    ax.legend(fontsize=8)
    ax.set_title("scaling across devices", fontsize=10)


def _plot_online(ax: Any, result: dict[str, Any], engine_label: str) -> None:
    levels = [level["concurrency"] for level in result["levels"]]
    ax.plot(
        levels,
        [level["requests_per_s"] for level in result["levels"]],
        marker="o",
        label="online req/s",
    )
    offline = result.get("offline")
    if offline:
        ax.axhline(
            offline["sequences_per_s"],
            linestyle="--",
            color="gray",
            label=f"offline batch {offline['batch_size']}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent clients (batch-1 requests)")
    ax.set_ylabel("requests/s")
    ax.legend(fontsize=8)
    ax.set_title("online, dynamic batching", fontsize=10)


def _plot_generation(ax: Any, result: dict[str, Any], engine_label: str) -> None:
    rows = result.get("rows", [])
    labels = [str(r.get("batch_size", "?")) for r in rows]
    series = {engine_label: [float(r.get("engine_tokens_per_s") or 0) for r in rows]}
    if any(r.get("baseline_tokens_per_s") for r in rows):
        series["HF generate"] = [float(r.get("baseline_tokens_per_s") or 0) for r in rows]
    _bars(ax, labels, series, "new tokens/s")
    ax.set_xlabel("batch size")
    ax.set_title("generation", fontsize=10)
