"""One TensorRT pipeline stage of a decoder, stepped by ``StagedDecoderSession``.

A stage is the TensorRT decoder step (``tensorrt._StepRunner``) with two differences: its first
input may be the previous stage's hidden state instead of ``input_ids``, and its output may be
a hidden state for the next stage instead of the logits. Everything of a stage stays on its own
GPU: the engine, its activations and the KV cache of its own layers.

The KV buffers belong to the session, not to the stage (``StageKV``): twin sessions step the
same loaded stage with their own caches. Each is a past/present pair per cache tensor sized
``[max_batch, heads, max_total - 1, head_dim]`` that swap roles every step, as in the unsplit
session. The boundary hidden state moves as in the encoder pipeline (``runners/pipeline.py``):
device -> the stage's pinned buffer -> a host array -> the next stage's pinned buffer ->
its device. Only the last stage's last-position logits come back to the host.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import EngineDir, TensorSpec
from trtpipe.errors import InputError, RunnerError
from trtpipe.generation.kv_cache import PAST_RE, CacheTensor, DecoderSpec
from trtpipe.generation.tensorrt import TOKEN_INPUTS, _StepRunner
from trtpipe.runners.tensorrt import BufferPlan


def first_input(engine: EngineDir) -> str:
    """What a stage steps over: ``input_ids`` (stage 0) or the previous stage's hidden state."""
    names = [s.name for s in engine.manifest.inputs]
    if "input_ids" in names:
        return "input_ids"
    hidden = [n for n in names if n not in TOKEN_INPUTS and not PAST_RE.match(n)]
    if len(hidden) != 1 or hidden[0] not in engine.manifest.profile:
        raise InputError(f"{engine.path}: a decoder stage needs input_ids or one hidden state")
    return hidden[0]


def stage_spec(engine: EngineDir, whole: DecoderSpec) -> DecoderSpec:
    """The decoder spec of one stage: its own caches, its first input's batch/length limits,
    the whole model's total length; ``vocab_size`` 0 for a stage that gives no logits."""
    manifest = engine.manifest
    outputs = {o.name: o for o in manifest.outputs}
    cache = []
    for spec in manifest.inputs:
        match = PAST_RE.match(spec.name)
        if not match:
            continue
        present = f"present.{match.group(1)}.{match.group(2)}"
        if present not in outputs:
            raise InputError(f"{engine.path}: input {spec.name} has no {present} output")
        cache.append(CacheTensor(spec.name, present, spec.shape[1], spec.shape[3], spec.dtype))
    cache.sort(key=lambda c: (int(c.past.split(".")[1]), c.past))
    limits = manifest.profile[first_input(engine)].max
    logits = outputs.get("logits")
    return DecoderSpec(
        cache=tuple(cache),
        has_position_ids=any(s.name == "position_ids" for s in manifest.inputs),
        max_batch=int(limits[0]),
        max_prompt=int(limits[1]),
        max_total=whole.max_total,
        vocab_size=int(logits.shape[-1]) if logits is not None else 0,
    )


class _StageRunner(_StepRunner):
    """The decoder step runner without KV buffers (the sessions own them) and with the
    boundary hidden state staged through pinned memory."""

    def __init__(self, engine: EngineDir, device: Device, spec: DecoderSpec):
        super().__init__(engine, device, spec)
        cache = {c.past for c in spec.cache} | {c.present for c in spec.cache}
        self.boundary = [
            o.name for o in engine.manifest.outputs if o.name != "logits" and o.name not in cache
        ]

    def buffer_plan(self) -> dict[str, BufferPlan]:
        """The unsplit plan less the KV tensors; the hidden-state output pinned at its maximum
        (the hidden-state input already is, like the token inputs)."""
        cache = {c.past for c in self.spec.cache} | {c.present for c in self.spec.cache}
        plan = {name: p for name, p in super().buffer_plan().items() if name not in cache}
        for name in self.boundary:
            plan[name] = BufferPlan(plan[name].device_shape, plan[name].device_shape)
        return plan

    def run_stage(
        self,
        feeds: dict[str, np.ndarray],
        cache_shapes: dict[str, tuple[int, ...]],
        addresses: dict[str, int],
    ) -> dict[str, np.ndarray]:
        """One step: the hidden state (whole) or the logits (last position) as host arrays."""
        from trtpipe import cuda

        with self._lock:
            self.execute(feeds, cache_shapes, addresses)
            if "logits" in self._output_names:
                return {"logits": self.last_logits(cuda)}
            views: dict[str, np.ndarray] = {}
            for name in self.boundary:
                shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
                host = self._host_buffers[name]
                views[name] = host.view(shape)
                device = self._device_buffers[name].ptr
                cuda.memcpy_dtoh_async(host.ptr, device, views[name].nbytes, self._stream)
            self._stream.synchronize()
            return {name: view.copy() for name, view in views.items()}


class StageKV:
    """One session's cache for one stage: a past/present device buffer pair per tensor."""

    def __init__(self) -> None:
        self.buffers: list[Any] = []
        self.past_ptr: dict[str, int] = {}
        self.present_ptr: dict[str, int] = {}
        self.batch = 0
        self.past_length = 0


class TensorRTDecoderStage:
    """One TensorRT stage engine on its GPU; shared by twin sessions, one step at a time.

    The interface ``StagedDecoderSession`` chains (as its ONNX Runtime ``DecoderStage``):
    ``empty_cache`` / ``run`` / ``read_cache`` / ``write_cache`` / ``free_cache`` on a
    per-session cache state, ``load`` / ``close`` on the shared stage.
    """

    def __init__(self, index: int, engine: EngineDir, device: Device, whole: DecoderSpec):
        self.index = index
        self.engine = engine
        self.device = device
        self.spec = stage_spec(engine, whole)
        self.first = first_input(engine)
        self.cache: list[CacheTensor] = list(self.spec.cache)
        self.inputs: list[TensorSpec] = [
            s for s in engine.manifest.inputs if not PAST_RE.match(s.name)
        ]
        self.runner = _StageRunner(engine, device, self.spec)
        self.lock = threading.Lock()
        self.busy_s = 0.0
        self.steps = 0

    def load(self) -> None:
        self.runner.load()

    def new_cache(self) -> StageKV:
        return StageKV()

    def _allocate(self, kv: StageKV) -> None:
        """Both roles of every cache tensor at the engine's room, on this stage's GPU."""
        from trtpipe import cuda

        if kv.buffers:
            return
        cuda.set_device(self.device.index)
        room = self.spec.max_batch * (self.spec.max_total - 1)
        try:
            for c in self.cache:
                nbytes = room * c.heads * c.head_dim * np.dtype(c.dtype).itemsize
                past, present = cuda.DeviceBuffer(nbytes), cuda.DeviceBuffer(nbytes)
                kv.buffers += [past, present]
                kv.past_ptr[c.past], kv.present_ptr[c.past] = past.ptr, present.ptr
        except BaseException:
            self.free_cache(kv)
            raise

    def empty_cache(self, batch: int, kv: StageKV) -> StageKV:
        self._allocate(kv)
        kv.batch, kv.past_length = batch, 0
        return kv

    def run(
        self, env: dict[str, Any], made_on: dict[str, Device], kv: StageKV
    ) -> tuple[dict[str, np.ndarray], StageKV]:
        """One step of this stage: host inputs from ``env``, the cache on this GPU; returns
        the hidden state or the logits as host arrays."""
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in env:
                raise RunnerError(f"stage {self.index} needs {spec.name}, which nothing provides")
            feeds[spec.name] = np.ascontiguousarray(env[spec.name], dtype=spec.dtype)
        new = int(feeds[self.first].shape[1])
        if kv.past_length + new > self.spec.max_total - 1:
            raise InputError(
                f"{kv.past_length} cached + {new} new tokens exceed the engine's KV room of "
                f"{self.spec.max_total - 1} positions"
            )
        shapes: dict[str, tuple[int, ...]] = {
            c.past: (kv.batch, c.heads, kv.past_length, c.head_dim) for c in self.cache
        }
        addresses: dict[str, int] = {}
        for c in self.cache:
            addresses[c.past] = kv.past_ptr[c.past]
            addresses[c.present] = kv.present_ptr[c.past]
        with self.lock:
            start = time.perf_counter()
            try:
                outputs = self.runner.run_stage(feeds, shapes, addresses)
            finally:
                self.busy_s += time.perf_counter() - start
                self.steps += 1
        kv.past_ptr, kv.present_ptr = kv.present_ptr, kv.past_ptr
        kv.past_length += new
        return outputs, kv

    def read_cache(self, kv: StageKV) -> list[np.ndarray]:
        """Host copies in ``self.cache`` order (short-lived pinned staging)."""
        return [
            self.runner.download(
                kv.past_ptr[c.past],
                np.dtype(c.dtype),
                (kv.batch, c.heads, kv.past_length, c.head_dim),
            )
            for c in self.cache
        ]

    def write_cache(self, kv: StageKV, arrays: list[np.ndarray]) -> StageKV:
        """Replace the cache (``self.cache`` order); batch and length from the shapes."""
        batch, _, past, _ = (int(d) for d in arrays[0].shape)
        if batch > self.spec.max_batch or past > self.spec.max_total - 1:
            raise InputError(
                f"cache of batch {batch} and length {past} exceeds the engine's room "
                f"({self.spec.max_batch} x {self.spec.max_total - 1})"
            )
        self._allocate(kv)
        for c, array in zip(self.cache, arrays, strict=True):
            want = (batch, c.heads, past, c.head_dim)
            if tuple(array.shape) != want:
                raise InputError(f"cache array for {c.past} has shape {array.shape}, want {want}")
            host = np.ascontiguousarray(array, dtype=np.dtype(c.dtype))
            self.runner.upload(kv.past_ptr[c.past], host)
        kv.batch, kv.past_length = batch, past
        return kv

    def free_cache(self, kv: StageKV) -> None:
        """Free a session's KV buffers on this GPU; safe to call twice."""
        from trtpipe import cuda

        if kv.buffers:
            cuda.set_device(self.device.index)
        for buffer in kv.buffers:
            buffer.close()
        kv.buffers, kv.past_ptr, kv.present_ptr = [], {}, {}
        kv.batch = kv.past_length = 0

    def close(self) -> None:
        self.runner.close()
