"""Backend-neutral decoder stepping with the KV cache kept on the device between steps.

A ``DecoderSession`` runs one decoder engine on one device: ``start(batch)`` sets an empty cache
(past length 0), each ``step`` feeds new tokens and returns the last position's logits; the
``present.*`` outputs of a step become the ``past_key_values.*`` inputs of the next one without
a trip through host memory (ONNX Runtime: IO binding of OrtValues; TensorRT: device buffers
swapped between the present and past roles).
"""

from __future__ import annotations

import abc
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import EngineDir, Manifest, TensorSpec
from trtpipe.errors import InputError, RunnerError

log = logging.getLogger(__name__)

PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def is_decoder(inputs: Iterable[TensorSpec]) -> bool:
    """A KV-cache decoder (served by generation endpoints, not plain v2 infer)."""
    return any(PAST_RE.match(spec.name) for spec in inputs)


@dataclass(frozen=True)
class CacheTensor:
    """One past input and the present output that feeds it on the next step."""

    past: str
    present: str
    heads: int
    head_dim: int
    dtype: str


@dataclass(frozen=True)
class DecoderSpec:
    """What the loop needs to know about a decoder engine, read from its manifest."""

    cache: tuple[CacheTensor, ...]
    has_position_ids: bool
    max_batch: int
    max_prompt: int
    max_total: int
    vocab_size: int

    @classmethod
    def from_engine(cls, engine: EngineDir) -> DecoderSpec:
        manifest = engine.manifest
        names = {s.name for s in manifest.inputs}
        outputs = {s.name for s in manifest.outputs}
        if "input_ids" not in names or "logits" not in outputs:
            raise InputError(
                f"{engine.path} is not a text-generation engine (needs input_ids -> logits); "
                "export with --task text-generation-with-past"
            )
        cache = []
        for spec in manifest.inputs:
            match = PAST_RE.match(spec.name)
            if not match:
                continue
            present = f"present.{match.group(1)}.{match.group(2)}"
            if present not in outputs:
                raise InputError(f"{engine.path}: input {spec.name} has no {present} output")
            cache.append(CacheTensor(spec.name, present, spec.shape[1], spec.shape[3], spec.dtype))
        if not cache:
            raise InputError(
                f"{engine.path} has no past_key_values inputs; export the model with "
                "--task text-generation-with-past so generation can reuse the KV cache"
            )
        cache.sort(key=lambda c: (int(c.past.split(".")[1]), c.past))
        return cls(
            cache=tuple(cache),
            has_position_ids="position_ids" in names,
            max_batch=manifest.profile["input_ids"].max[0],
            max_prompt=manifest.profile["input_ids"].max[1],
            max_total=max_total_length(engine, manifest, cache),
            vocab_size=next(s.shape[-1] for s in manifest.outputs if s.name == "logits"),
        )


def max_total_length(engine: EngineDir, manifest: Manifest, cache: list[CacheTensor]) -> int:
    """Longest prompt + generated sequence: profile total/past limits and the model's positions."""
    limits = [manifest.profile[c.past].max[2] + 1 for c in cache if c.past in manifest.profile]
    if "attention_mask" in manifest.profile:
        limits.append(manifest.profile["attention_mask"].max[1])
    config = engine.path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        for key in ("max_position_embeddings", "n_positions"):
            if isinstance(data.get(key), int):
                limits.append(int(data[key]))
                break
    return min(limits) if limits else 1 << 30


class DecoderSession(abc.ABC):
    """One decoder engine on one device, holding one batch's KV cache between steps."""

    def __init__(self, engine: EngineDir, device: Device):
        self.engine = engine
        self.device = device
        self.spec = DecoderSpec.from_engine(engine)

    @abc.abstractmethod
    def load(self) -> None: ...

    @abc.abstractmethod
    def start(self, batch: int) -> None:
        """Forget any cache; the next step is a prefill with past length 0."""

    @abc.abstractmethod
    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> np.ndarray:
        """Run new tokens [B, S] (mask covers past + new); return float32 logits [B, V]."""

    def read_cache(self) -> list[np.ndarray]:
        """Host copies of the cache, ``[batch, heads, past, head_dim]`` in ``spec.cache`` order.

        With ``write_cache`` this lets the continuous-batching scheduler regroup rows.
        """
        raise RunnerError(f"{self.describe()} cannot hand its KV cache to the host")

    def write_cache(self, arrays: list[np.ndarray]) -> None:
        """Replace the cache (batch and past length from the arrays' shapes)."""
        raise RunnerError(f"{self.describe()} cannot take a KV cache from the host")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free device memory; safe to call twice."""

    def describe(self) -> str:
        return f"{self.engine.manifest.backend}@{self.device}"


class OrtDecoderSession(DecoderSession):
    """ONNX Runtime with IO binding: present OrtValues are bound as the next step's past."""

    def __init__(self, engine: EngineDir, device: Device, threads: int | None = None):
        super().__init__(engine, device)
        from trtpipe.runners.onnxruntime import OnnxRuntimeRunner

        self.runner = OnnxRuntimeRunner(engine, device, threads)
        self.past: dict[str, Any] = {}
        self.device_type = "cuda" if device.is_gpu else "cpu"

    def load(self) -> None:
        self.runner.load()

    def start(self, batch: int) -> None:
        import onnxruntime as ort

        self.past = {}
        for c in self.spec.cache:
            self.past[c.past] = ort.OrtValue.ortvalue_from_shape_and_type(
                [batch, c.heads, 0, c.head_dim],
                np.dtype(c.dtype),
                self.device_type,
                self.device.index,
            )

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> np.ndarray:
        session = self.runner.session
        if session is None:
            raise RunnerError(f"{self.describe()} is not loaded")
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        if self.spec.has_position_ids:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        for name, value in self.past.items():
            binding.bind_ortvalue_input(name, value)
        # Logits come back to host (the sampler needs them); the cache stays on the device.
        binding.bind_output("logits", "cpu")
        for c in self.spec.cache:
            binding.bind_output(c.present, self.device_type, self.device.index)
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own types
            raise RunnerError(f"{self.describe()} decode step failed: {exc}") from exc
        outputs = binding.get_outputs()
        self.past = {c.past: outputs[i + 1] for i, c in enumerate(self.spec.cache)}
        logits = outputs[0].numpy()
        return np.asarray(logits[:, -1, :], dtype=np.float32)

    def read_cache(self) -> list[np.ndarray]:
        return [np.asarray(self.past[c.past].numpy()) for c in self.spec.cache]

    def write_cache(self, arrays: list[np.ndarray]) -> None:
        import onnxruntime as ort

        self.past = {
            c.past: ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(array, dtype=np.dtype(c.dtype)),
                self.device_type,
                self.device.index,
            )
            for c, array in zip(self.spec.cache, arrays, strict=True)
        }

    def close(self) -> None:
        self.past = {}
        self.runner.close()
