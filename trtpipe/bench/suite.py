"""``trtpipe bench ENGINE_DIR``: the offline benchmarks in one call, returning one report dict.

Options are checked against the engine's manifest before anything heavy is loaded, so a bad
``--batch-sizes`` fails in a second with a message instead of after loading two models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtpipe.bench.common import (
    baseline_runner,
    check_shapes,
    default_device,
    engine_runner,
    sequence_range,
)
from trtpipe.bench.report import machine_info
from trtpipe.devices import Device, cpu_cores, parse_device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError
from trtpipe.gate import gate_status

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_SEQ_LENS = (32, 128)


@dataclass
class BenchConfig:
    """Everything ``trtpipe bench ENGINE_DIR`` accepts for offline runs."""

    engine_dir: Path
    baseline: str = "torch"
    batch_sizes: list[int] | None = None
    seq_lens: list[int] | None = None
    fixed: bool = True
    runs: int = 10
    warmup: int = 2
    threads: int | None = None
    device: str | None = None
    reference: str | None = None
    texts: Path | None = None
    text_runs: int = 3
    text_limit: int | None = None
    sorted_baseline: bool = False
    devices: str | None = None
    gpus: str | None = None
    scaling_batches: int = 8
    gate: bool = False
    gate_report: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def engine_summary(engine: EngineDir) -> dict[str, Any]:
    m = engine.manifest
    return {
        "path": str(engine.path),
        "name": engine.name,
        "backend": m.backend,
        "precision": m.precision,
        "task": m.task,
        "source_model": m.source_model,
        "max_batch_size": m.max_batch_size,
        "sequence_range": list(sequence_range(m)),
    }


def _shapes(engine: EngineDir, config: BenchConfig) -> tuple[list[int], list[int]]:
    """Asked-for shapes must fit the profile; defaults are clipped to it."""
    manifest = engine.manifest
    low, high = sequence_range(manifest)
    batch_sizes = (
        config.batch_sizes
        or [b for b in DEFAULT_BATCH_SIZES if b <= manifest.max_batch_size]
        or [manifest.max_batch_size]
    )
    seq_lens = config.seq_lens or [s for s in DEFAULT_SEQ_LENS if low <= s <= high] or [high]
    check_shapes(manifest, batch_sizes, seq_lens)
    return batch_sizes, seq_lens


def _check(engine: EngineDir, config: BenchConfig) -> None:
    from trtpipe.generation.kv_cache import is_decoder

    if is_decoder(engine.manifest.inputs):
        raise InputError(
            f"{engine.path} is a text-generation (KV-cache) engine: benchmark it with "
            "--generate (tokens/s and time to first token)"
        )
    if config.runs < 1 or config.text_runs < 1:
        raise InputError("--runs and --text-runs must be at least 1")
    if config.warmup < 0:
        raise InputError("--warmup cannot be negative")
    if config.threads is not None and config.threads < 1:
        raise InputError("--threads must be at least 1")
    if config.baseline not in ("torch", "none"):
        raise InputError(f"unknown --baseline {config.baseline!r}; use torch or none")
    if config.texts is not None and not engine.has_tokenizer():
        raise InputError(f"{engine.path} has no tokenizer files, so --texts cannot be used")


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Fixed shapes, real text and scaling as asked; returns the JSON-ready report."""
    engine = EngineDir(config.engine_dir)
    _check(engine, config)
    batch_sizes, seq_lens = _shapes(engine, config)
    texts = _texts(config) if config.texts is not None else None
    configs = None
    if config.devices or config.gpus:
        from trtpipe.bench.scaling import scaling_configs

        configs = scaling_configs(config.devices, config.gpus)
    device = parse_device(config.device) if config.device else default_device(engine.manifest)
    threads = config.threads or cpu_cores()
    gate = gate_status(engine, config.gate_report, config.gate)
    report: dict[str, Any] = {
        "kind": "offline",
        "machine": machine_info(),
        "engine": engine_summary(engine),
        "gate": gate,
        "settings": {
            "device": str(device),
            "threads": threads,
            "baseline": _baseline_label(config.baseline, device),
            "runs": config.runs,
            "warmup": config.warmup,
            "text_runs": config.text_runs,
        },
    }
    if config.fixed or texts is not None:
        _run_offline(engine, config, device, threads, batch_sizes, seq_lens, texts, report)
    if configs is not None:
        from trtpipe.bench.scaling import bench_scaling

        result = bench_scaling(
            engine,
            configs,
            batch=max(batch_sizes),
            seq=max(seq_lens),
            batches=config.scaling_batches,
            runs=max(1, min(config.runs, 5)),
            threads=config.threads,
        )
        report["scaling"] = result.to_dict()
    return report


def _baseline_label(baseline: str, device: Device) -> str | None:
    if baseline == "none":
        return None
    return f"PyTorch eager {'fp16' if device.is_gpu else 'fp32'} on {device}"


def _texts(config: BenchConfig) -> list[str]:
    from trtpipe.text import read_texts

    assert config.texts is not None
    texts = read_texts(config.texts)
    if config.text_limit:
        texts = texts[: config.text_limit]
    return texts


def _run_offline(
    engine: EngineDir,
    config: BenchConfig,
    device: Device,
    threads: int,
    batch_sizes: list[int],
    seq_lens: list[int],
    texts: list[str] | None,
    report: dict[str, Any],
) -> None:
    from trtpipe.bench.offline import bench_fixed
    from trtpipe.compare import vocab_size

    manifest = engine.manifest
    runner = engine_runner(engine, device, threads)
    baseline = None
    if config.baseline == "torch":
        baseline = baseline_runner(manifest, device, threads, config.reference)
    try:
        runner.load()
        if baseline is not None:
            baseline.load()
        if config.fixed:
            results = bench_fixed(
                runner,
                baseline,
                batch_sizes,
                seq_lens,
                vocab_size(engine.path),
                config.runs,
                config.warmup,
            )
            report["fixed"] = [r.to_dict() for r in results]
        if texts is not None:
            from trtpipe.bench.text import bench_text, check_text_inputs
            from trtpipe.text import load_tokenizer

            check_text_inputs(manifest.inputs, manifest.task)
            result = bench_text(
                runner.infer,
                baseline.infer if baseline is not None else None,
                load_tokenizer(str(engine.path)),
                texts,
                manifest.inputs,
                max_length=sequence_range(manifest)[1],
                max_batch=manifest.max_batch_size,
                runs=config.text_runs,
                warmup=1 if config.warmup else 0,
                sorted_baseline=config.sorted_baseline,
            )
            report["text"] = {**result.to_dict(), "source": str(config.texts)}
    finally:
        runner.close()
        if baseline is not None:
            baseline.close()


def render(report: dict[str, Any]) -> str:
    """The terminal view of a report: one table per benchmark that ran."""
    from trtpipe.bench import report as rp
    from trtpipe.bench.served_text import served_text_table

    lines = []
    engine = report.get("engine")
    if engine:
        lines.append(f"engine {engine['path']} ({engine['backend']} {engine['precision']})")
    settings = report.get("settings", {})
    if settings.get("device"):
        lines.append(
            f"device {settings['device']}, {settings['threads']} threads per side; "
            f"baseline: {settings.get('baseline') or 'none'}"
        )
    if report.get("gate"):
        lines.append(rp.gate_line(report["gate"]))
    for key, title, fmt in (
        ("fixed", "fixed shapes", rp.fixed_table),
        ("text", "real text, end to end", rp.text_table),
        ("scaling", "scaling", rp.scaling_table),
        ("online", "online", rp.online_table),
        ("generation", "generation", rp.generation_table),
        ("served_text", "served real text", served_text_table),
    ):
        if report.get(key):
            lines += ["", f"== {title} ==", fmt(report[key])]
    machine = report.get("machine", {})
    if machine:
        lines += [
            "",
            f"machine: {machine['cpu']}, {machine['cores']} cores"
            + (f", GPUs {', '.join(machine['gpus'])}" if machine["gpus"] else "")
            + f"; {machine['date']}",
        ]
    return "\n".join(lines)
