"""Prometheus series of the served generation models, read from their schedulers at scrape time.

Per model: requests (finished, cancelled, timed out, rejected), prompt and generated tokens,
decode steps and prefills, running and waiting sequences, KV-cache rows in use and available,
and histograms of time to first token and inter-token latency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from trtpipe.generation.histogram import LatencyHistogram

COUNTERS = {
    "finished": ("trtpipe_generation_requests_finished", "Sequences that finished"),
    "cancelled": ("trtpipe_generation_requests_cancelled", "Sequences cancelled by clients"),
    "timed_out": ("trtpipe_generation_requests_timed_out", "Sequences not admitted in time"),
    "rejected": ("trtpipe_generation_requests_rejected", "Requests refused (queue full, draining)"),
    "prompt_tokens": ("trtpipe_generation_prompt_tokens", "Prompt tokens prefilled"),
    "generated_tokens": ("trtpipe_generation_generated_tokens", "Tokens generated"),
    "steps": ("trtpipe_generation_decode_steps", "Decode steps run"),
    "prefills": ("trtpipe_generation_prefills", "Prefill launches (one per admission burst)"),
}
GAUGES = {
    "running": ("trtpipe_generation_running_sequences", "Sequences in the running batch"),
    "waiting": ("trtpipe_generation_waiting_sequences", "Sequences waiting for admission"),
    "slots_in_use": ("trtpipe_generation_kv_slots_in_use", "KV-cache rows held"),
    "slots": ("trtpipe_generation_kv_slots", "KV-cache rows available (batch maximum)"),
}


class GenerationCollector(Collector):
    """Reads ``models()`` (name -> ServedGeneration) at every scrape."""

    def __init__(self, models: Callable[[], dict[str, Any]]):
        self.models = models

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}

        def family(name: str, doc: str, kind: str) -> Metric:
            if name not in families:
                families[name] = Metric(name, doc, kind)
            return families[name]

        for name, model in sorted(self.models().items()):
            labels = {"model": name, "version": str(getattr(model, "version", "1"))}
            stats = model.stats()
            for key, (metric, doc) in COUNTERS.items():
                family(metric, doc, "counter").add_sample(metric, labels, float(stats[key]))
            for key, (metric, doc) in GAUGES.items():
                family(metric, doc, "gauge").add_sample(metric, labels, float(stats[key]))
            for metric, doc, histogram in (
                (
                    "trtpipe_generation_time_to_first_token_seconds",
                    "Time from submission to the first token",
                    model.histogram("ttft"),
                ),
                (
                    "trtpipe_generation_inter_token_latency_seconds",
                    "Time between two tokens of one sequence",
                    model.histogram("itl"),
                ),
            ):
                add_histogram(family(metric, doc, "histogram"), metric, labels, histogram)
        yield from families.values()


def add_histogram(
    metric: Metric, name: str, labels: dict[str, str], histogram: LatencyHistogram
) -> None:
    for bound, count in histogram.cumulative():
        metric.add_sample(f"{name}_bucket", {**labels, "le": bound}, float(count))
    metric.add_sample(f"{name}_count", labels, float(histogram.count))
    metric.add_sample(f"{name}_sum", labels, histogram.total)
