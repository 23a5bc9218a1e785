"""Prometheus metrics with Triton's names, read from the models at scrape time.

Nothing is counted twice: request counts come from the served models, inference/execution
counts per device from the pool, queue/compute durations from the batcher. Each server has its
own ``CollectorRegistry`` so several servers (and tests) in one process never collide. Counters
keep Triton's exact names (no ``_total`` suffix) so existing Triton dashboards work unchanged.
Beside them, the process's standard Prometheus metrics (``process_cpu_seconds_total`` and the
rest, on Linux) and the CPU seconds of the event loop's thread (:class:`LoopCpuCollector`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from trtpipe.server.repository import ModelRepository

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RepositoryCollector(Collector):
    def __init__(self, repository: ModelRepository):
        self.repository = repository

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}

        def add(name: str, kind: str, doc: str, labels: dict[str, str], value: float) -> None:
            if name not in families:
                families[name] = Metric(name, doc, kind)
            families[name].add_sample(name, labels, float(value))

        for model in self.repository:
            base = {"model": model.name, "version": model.version}
            stats = model.batcher_stats()
            add(
                "nv_inference_request_success",
                "counter",
                "Number of successful inference requests",
                base,
                model.success.count,
            )
            add(
                "nv_inference_request_failure",
                "counter",
                "Number of failed inference requests",
                base,
                model.failure.count,
            )
            add(
                "nv_inference_request_duration_us",
                "counter",
                "Cumulative inference request duration in microseconds",
                base,
                (model.success.ns + model.failure.ns) / 1000,
            )
            add(
                "nv_inference_queue_duration_us",
                "counter",
                "Cumulative time requests waited in the batcher queue, microseconds",
                base,
                stats.get("queue_ns", 0) / 1000,
            )
            add(
                "nv_inference_compute_infer_duration_us",
                "counter",
                "Cumulative inference compute time charged per request, microseconds",
                base,
                stats.get("compute_infer_ns", 0) / 1000,
            )
            add(
                "nv_inference_pending_request_count",
                "gauge",
                "Requests waiting in the batcher queue",
                base,
                model.pending,
            )
            add(
                "nv_model_ready",
                "gauge",
                "1 when the model has at least one healthy device",
                base,
                1 if model.ready else 0,
            )
            for status in model.devices_status():
                labels = {**base, "device": str(status.get("device"))}
                add(
                    "nv_inference_count",
                    "counter",
                    "Number of inferences performed (batch rows, not executions)",
                    labels,
                    status.get("inferences", 0),
                )
                add(
                    "nv_inference_exec_count",
                    "counter",
                    "Number of batch executions; inference_count / exec_count = mean batch size",
                    labels,
                    status.get("executions", 0),
                )
                add(
                    "nv_device_failure_count",
                    "counter",
                    "Number of batches that failed on the device",
                    labels,
                    status.get("failures", 0),
                )
                add(
                    "nv_device_healthy",
                    "gauge",
                    "1 when the device's runner is healthy",
                    labels,
                    1 if status.get("healthy") else 0,
                )
                add(
                    "nv_device_busy",
                    "gauge",
                    "Batches in flight on the device",
                    labels,
                    float(status.get("inflight", 1 if status.get("busy") else 0)),
                )
        yield from families.values()


LOOP_CPU = "trtpipe_event_loop_cpu_seconds"


class LoopCpuCollector(Collector):
    """CPU seconds of the event loop's thread (``trtpipe_event_loop_cpu_seconds_total``).

    That thread runs all of the front end's Python: HTTP and gRPC requests, tokenizing, the
    batcher. On a CPU server it shares the cores with the engine, so its CPU per request is the
    front end's cost under load (``trtpipe bench --url`` reports it per level). Nothing is
    reported until :meth:`watch` names the thread, or where the platform has no per-thread
    CPU clock.
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None

    def watch(self) -> None:
        """Watch the calling thread (call it on the event loop)."""
        self.thread = threading.current_thread()

    def seconds(self) -> float | None:
        thread = self.thread
        if thread is None or thread.ident is None or not hasattr(time, "pthread_getcpuclockid"):
            return None
        if not thread.is_alive():  # its pthread handle may be gone: never ask for its clock
            return None
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except OSError:
            return None

    def collect(self) -> Iterator[Metric]:
        seconds = self.seconds()
        if seconds is not None:
            family = CounterMetricFamily(
                LOOP_CPU, "CPU seconds of the event loop thread (the front end's Python)"
            )
            family.add_metric([], seconds)
            yield family


class ServerMetrics:
    """A private registry for one server."""

    def __init__(self, repository: ModelRepository):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RepositoryCollector(repository))
        from trtpipe.server.generation_metrics import GenerationCollector

        self.registry.register(GenerationCollector(lambda: dict(repository.generators)))
        ProcessCollector(registry=self.registry)
        self.loop_cpu = LoopCpuCollector()
        self.registry.register(self.loop_cpu)

    def render(self) -> bytes:
        return render(self.registry)


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text format 0.0.4, keeping counter names as given (Triton style)."""
    lines: list[str] = []
    for metric in registry.collect():
        kind = {"unknown": "untyped"}.get(metric.type, metric.type)
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        lines.append(f"# HELP {metric.name} {doc}")
        lines.append(f"# TYPE {metric.name} {kind}")
        for sample in metric.samples:
            labels = ",".join(
                f'{key}="{_escape(value)}"' for key, value in sorted(sample.labels.items())
            )
            label_part = f"{{{labels}}}" if labels else ""
            lines.append(f"{sample.name}{label_part} {floatToGoString(sample.value)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
