"""A pipeline-stage decoder engine as one ``DecoderSession``: stage i on device i, its own KV.

Each stage engine (``trtpipe.build.decoder_stages``) holds only its own layers' cache, so a
step runs the stages in order: stage 0 takes the tokens, mask and positions and hands its hidden
state on; every later stage takes that hidden state plus the same mask and positions; the last
returns the logits. Each stage's ``present.*`` stay on its device as the next step's past (ONNX
Runtime IO binding of OrtValues, as ``OrtDecoderSession``; TensorRT stages, in
``tensorrt_stage``, swap device buffers as ``TensorRTDecoderSession``). Between CPU workers the
hidden state passes as the OrtValue itself; between GPUs it is staged through host memory.

``Generator``, the continuous-batching ``Scheduler`` and the decoder gate drive this like any
session. ``twin()`` gives a second session over the same loaded stages with its own cache: two
groups of sequences stepped from two threads then overlap across the stages (while one group
runs stage 1, the other runs stage 0), since each stage admits one step at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from trtpipe.devices import Device, cpu_cores
from trtpipe.engine import EngineDir, TensorSpec
from trtpipe.errors import BackendUnavailableError, InputError, RunnerError
from trtpipe.generation.kv_cache import PAST_RE, CacheTensor, DecoderSession, DecoderSpec

log = logging.getLogger(__name__)

_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}


class DecoderStage:
    """One stage engine loaded on its device; shared by twin sessions, one step at a time."""

    def __init__(self, index: int, engine: EngineDir, device: Device, threads: int | None):
        from trtpipe.runners.onnxruntime import OnnxRuntimeRunner

        self.index = index
        self.engine = engine
        self.device = device
        self.device_type = "cuda" if device.is_gpu else "cpu"
        self.runner = OnnxRuntimeRunner(engine, device, threads)
        self.inputs: list[TensorSpec] = list(engine.manifest.inputs)
        self.output_names = [o.name for o in engine.manifest.outputs]
        outputs = set(self.output_names)
        self.cache: list[CacheTensor] = []
        for spec in self.inputs:
            match = PAST_RE.match(spec.name)
            if match:
                present = f"present.{match.group(1)}.{match.group(2)}"
                if present not in outputs:
                    raise InputError(f"{engine.path}: input {spec.name} has no {present} output")
                self.cache.append(
                    CacheTensor(spec.name, present, spec.shape[1], spec.shape[3], spec.dtype)
                )
        self.lock = threading.Lock()
        self.busy_s = 0.0
        self.steps = 0

    def load(self) -> None:
        self.runner.load()

    def new_cache(self) -> dict[str, Any]:
        return {}

    def empty_cache(self, batch: int, past: dict[str, Any]) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            c.past: ort.OrtValue.ortvalue_from_shape_and_type(
                [batch, c.heads, 0, c.head_dim],
                np.dtype(c.dtype),
                self.device_type,
                self.device.index,
            )
            for c in self.cache
        }

    def run(
        self, env: dict[str, Any], made_on: dict[str, Device], past: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One step of this stage: inputs from ``env`` (host arrays or earlier stages'
        OrtValues) and ``past``; the hidden state as an OrtValue on this device or the last
        position's logits on the host, and the new past."""
        session = self.runner.session
        if session is None:
            raise RunnerError(f"stage {self.index} on {self.device} is not loaded")
        binding = session.io_binding()
        for spec in self.inputs:
            name = spec.name
            if name in past:
                binding.bind_ortvalue_input(name, past[name])
                continue
            if name not in env:
                raise RunnerError(f"stage {self.index} needs {name}, which nothing provides")
            value = env[name]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=spec.dtype))
            elif self._takes(value, spec, made_on.get(name)):
                binding.bind_ortvalue_input(name, value)
            else:  # another GPU or another dtype: through host memory
                binding.bind_cpu_input(name, np.ascontiguousarray(value.numpy(), spec.dtype))
        for name in self.output_names:
            if name == "logits":  # the sampler needs them on the host
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, self.device_type, self.device.index)
        with self.lock:
            start = time.perf_counter()
            try:
                session.run_with_iobinding(binding)
            except Exception as exc:  # onnxruntime raises its own types
                raise RunnerError(
                    f"stage {self.index} on {self.device}: decode step failed: {exc}"
                ) from exc
            finally:
                self.busy_s += time.perf_counter() - start
                self.steps += 1
        outputs = dict(zip(self.output_names, binding.get_outputs(), strict=True))
        past = {c.past: outputs.pop(c.present) for c in self.cache}
        if "logits" in outputs:
            logits = outputs["logits"].numpy()
            outputs["logits"] = np.asarray(logits[:, -1, :], dtype=np.float32)
        return outputs, past

    def read_cache(self, past: dict[str, Any]) -> list[np.ndarray]:
        return [np.asarray(past[c.past].numpy()) for c in self.cache]

    def write_cache(self, past: dict[str, Any], arrays: list[np.ndarray]) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            c.past: ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(array, dtype=np.dtype(c.dtype)),
                self.device_type,
                self.device.index,
            )
            for c, array in zip(self.cache, arrays, strict=True)
        }

    def free_cache(self, past: dict[str, Any]) -> None:
        past.clear()

    def _takes(self, value: Any, spec: TensorSpec, source: Device | None) -> bool:
        same_place = not self.device.is_gpu and value.device_name() == "cpu"
        if self.device.is_gpu:
            same_place = source == self.device
        return same_place and value.data_type() == _ORT_TYPES.get(spec.dtype)

    def close(self) -> None:
        self.runner.close()


def make_stage(
    index: int, engine: EngineDir, device: Device, threads: int | None, whole: DecoderSpec
) -> Any:
    """The stage for its backend: ONNX Runtime here, TensorRT in ``tensorrt_stage``."""
    backend = engine.manifest.backend
    if backend == "onnxruntime":
        return DecoderStage(index, engine, device, threads)
    if backend == "tensorrt":
        from trtpipe.generation.tensorrt_stage import TensorRTDecoderStage  # needs tensorrt

        return TensorRTDecoderStage(index, engine, device, whole)
    raise BackendUnavailableError(f"{engine.path}: no decoder stage for backend {backend!r}")


class StagedDecoderSession(DecoderSession):
    """The stages of one pipeline replica stepped in order, each with its own KV cache."""

    def __init__(
        self,
        engine: EngineDir,
        devices: Sequence[Device],
        threads: int | None = None,
        stages: list[DecoderStage] | None = None,
    ):
        super().__init__(engine, devices[0])
        stage_dirs = engine.stage_dirs()
        if len(devices) != len(stage_dirs):
            raise InputError(
                f"{engine.path} has {len(stage_dirs)} stages and needs {len(stage_dirs)} "
                f"devices per pipeline replica, got {len(devices)}"
            )
        self.devices = list(devices)
        self.owner = stages is None
        if stages is None:
            cpu_stages = sum(1 for d in self.devices if not d.is_gpu)
            per_stage = threads or (max(1, cpu_cores() // cpu_stages) if cpu_stages else None)
            stages = [
                make_stage(i, stage_dir, device, per_stage, self.spec)
                for i, (stage_dir, device) in enumerate(zip(stage_dirs, self.devices, strict=True))
            ]
        self.stages = stages
        # Where each cache tensor of the whole model lives: the scheduler reads and writes the
        # cache in ``spec.cache`` order across all stages.
        self.home: dict[str, int] = {c.past: s.index for s in stages for c in s.cache}
        missing = [c.past for c in self.spec.cache if c.past not in self.home]
        if missing or len(self.home) != len(self.spec.cache):
            raise InputError(
                f"{engine.path}: the stages' KV caches do not match the engine's "
                f"({', '.join(missing) or 'extra stage caches'}); rebuild it"
            )
        # Each stage's cache state of this session (ONNX Runtime: the past OrtValues by name;
        # TensorRT: its KV device buffers).
        self.past: list[Any] = [stage.new_cache() for stage in stages]
        self.started_at = time.perf_counter()

    def describe(self) -> str:
        return f"{self.engine.manifest.backend} pipeline[{','.join(str(d) for d in self.devices)}]"

    def load(self) -> None:
        if not self.owner:
            return  # a twin: the stages are the first session's
        from trtpipe.runners.pipeline import check_stage_memory

        check_stage_memory(self.engine.manifest.stages, self.devices)
        try:
            for stage in self.stages:
                stage.load()
        except BaseException:
            self.close()
            raise
        self.started_at = time.perf_counter()

    def twin(self) -> StagedDecoderSession:
        """Another session over the same loaded stages, with its own cache."""
        return StagedDecoderSession(self.engine, self.devices, stages=self.stages)

    def start(self, batch: int) -> None:
        self.past = [stage.empty_cache(batch, self.past[stage.index]) for stage in self.stages]

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> np.ndarray:
        env: dict[str, Any] = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        if self.spec.has_position_ids:
            env["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        made_on: dict[str, Device] = {}
        for stage in self.stages:
            outputs, self.past[stage.index] = stage.run(env, made_on, self.past[stage.index])
            env.update(outputs)
            made_on.update((name, stage.device) for name in outputs)
        return np.asarray(env["logits"], dtype=np.float32)

    def read_cache(self) -> list[np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for stage in self.stages:
            own = stage.read_cache(self.past[stage.index])
            arrays.update(zip((c.past for c in stage.cache), own, strict=True))
        return [arrays[c.past] for c in self.spec.cache]

    def write_cache(self, arrays: list[np.ndarray]) -> None:
        """Scatter the cache to the stages, checked whole first so no stage is left with a
        cache of another batch or length than the others."""
        if len(arrays) != len(self.spec.cache) or not arrays:
            raise InputError(f"expected {len(self.spec.cache)} cache arrays, got {len(arrays)}")
        batch, _, past, _ = (int(d) for d in arrays[0].shape)
        for c, array in zip(self.spec.cache, arrays, strict=True):
            want = (batch, c.heads, past, c.head_dim)
            if tuple(array.shape) != want:
                raise InputError(f"cache array for {c.past} has shape {array.shape}, want {want}")
        by_name = {c.past: a for c, a in zip(self.spec.cache, arrays, strict=True)}
        self.past = [
            stage.write_cache(self.past[stage.index], [by_name[c.past] for c in stage.cache])
            for stage in self.stages
        ]

    def bubble(self) -> list[float]:
        """Idle share of each stage since load (0 = always busy), over every twin's steps."""
        wall = time.perf_counter() - self.started_at
        if wall <= 0:
            return [0.0] * len(self.stages)
        return [max(0.0, 1.0 - stage.busy_s / wall) for stage in self.stages]

    def close(self) -> None:
        for stage, past in zip(self.stages, self.past, strict=True):
            stage.free_cache(past)
        if self.owner:
            for stage in self.stages:
                stage.close()
