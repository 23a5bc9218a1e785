"""TensorRT decoder stepping: the KV cache lives in device buffers that swap roles each step.

For each layer, the ``past_key_values.N.*`` and ``present.N.*`` buffers take turns: a step reads
the past from one and writes the present into the other, then the two swap, so the cache never
leaves the GPU. Only input_ids / attention_mask / position_ids go host->device and only the last
position's logits come back, with one synchronize per step.

Memory (see docs/runtime.md, "Memory"): pinned host memory only for what is staged (the token
inputs and one row of logits per sequence); device memory for the KV pair of every cache tensor
sized for the longest sequence the engine allows (``max_total - 1`` positions, in the engine's
own KV dtype: fp16 engines keep an fp16 cache) and for the prefill's full logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError, RunnerError
from trtpipe.generation.kv_cache import DecoderSession, DecoderSpec
from trtpipe.runners.tensorrt import BufferPlan, TensorRTRunner

TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


class _StepRunner(TensorRTRunner):
    """The TensorRT runner plus one decode step with caller-chosen cache addresses."""

    def __init__(self, engine: EngineDir, device: Device, spec: DecoderSpec):
        super().__init__(engine, device)
        self.spec = spec

    def buffer_plan(self) -> dict[str, BufferPlan]:
        """Pinned memory for the token inputs and last-position logits only.

        Token inputs: the profile maximum, the mask's length capped at the longest sequence.
        KV: ``[max_batch, heads, max_total - 1, head_dim]`` on the device for both roles.
        Logits: the prefill's ``[max_batch, max_prompt, vocab]`` on the device, one
        ``[max_batch, vocab]`` row set in pinned memory.
        """
        spec = self.spec
        kv_length = spec.max_total - 1
        cache = {c.past: c for c in spec.cache}
        cache.update({c.present: c for c in spec.cache})
        plan: dict[str, BufferPlan] = {}
        for name in self._input_names:
            shape = self.profile_max(name)
            if name in cache:
                c = cache[name]
                plan[name] = BufferPlan((spec.max_batch, c.heads, kv_length, c.head_dim), None)
            else:
                if name == "attention_mask" and len(shape) == 2:
                    shape = (shape[0], min(shape[1], spec.max_total))
                plan[name] = BufferPlan(shape, shape)
        for name in self._output_names:
            if name in cache:
                c = cache[name]
                plan[name] = BufferPlan((spec.max_batch, c.heads, kv_length, c.head_dim), None)
            elif name == "logits":
                rows = (spec.max_batch, spec.vocab_size)
                plan[name] = BufferPlan((spec.max_batch, spec.max_prompt, spec.vocab_size), rows)
            else:  # an output the loop never reads still needs an address
                for input_name in self._input_names:
                    self._context.set_input_shape(input_name, self.profile_max(input_name))
                shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
                plan[name] = BufferPlan(shape, None)
        return plan

    def step(
        self,
        feeds: dict[str, np.ndarray],
        cache_shapes: dict[str, tuple[int, ...]],
        addresses: dict[str, int],
    ) -> np.ndarray:
        from trtpipe import cuda

        with self._lock:
            self.execute(feeds, cache_shapes, addresses)
            return self.last_logits(cuda)

    def execute(
        self,
        feeds: dict[str, np.ndarray],
        cache_shapes: dict[str, tuple[int, ...]],
        addresses: dict[str, int],
    ) -> None:
        """Queue one step (inputs up, shapes and addresses set, the engine run) on the
        stream; the caller holds ``_lock``, fetches what it needs and synchronizes."""
        from trtpipe import cuda

        if self._context is None:
            raise RunnerError(f"{self.describe()} was closed")
        cuda.set_device(self.device.index)
        context, stream = self._context, self._stream
        for name, array in feeds.items():
            device = self._upload_input(cuda, name, array)
            self._set_address(name, device.ptr)
        for name, shape in cache_shapes.items():
            if not context.set_input_shape(name, shape):
                raise InputError(f"KV cache {name!r} shape {list(shape)} is outside the profile")
        others = {
            name: buffer.ptr
            for name, buffer in self._device_buffers.items()
            if name not in addresses and name not in feeds
        }
        for name, pointer in {**addresses, **others}.items():
            self._set_address(name, pointer)
        if not context.execute_async_v3(stream.handle):
            raise RunnerError(f"execute_async_v3 failed on {self.device}")

    def last_logits(self, cuda: Any) -> np.ndarray:
        """The last position's logits of every row -> host (pinned), after one synchronize."""
        stream = self._stream
        batch, seq, vocab = (int(d) for d in self._context.get_tensor_shape("logits"))
        host = self._host_buffers["logits"]
        row = vocab * host.dtype.itemsize
        device_logits = self._device_buffers["logits"].ptr
        if seq == 1:
            cuda.memcpy_dtoh_async(host.ptr, device_logits, batch * row, stream)
        else:  # only the last position of every row comes back
            for b in range(batch):
                offset = ((b * seq) + seq - 1) * row
                cuda.memcpy_dtoh_async(host.ptr + b * row, device_logits + offset, row, stream)
        stream.synchronize()
        return np.array(host.view((batch, vocab)), dtype=np.float32)

    def download(self, pointer: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """Device memory at ``pointer`` -> a host array, through a pinned buffer freed after."""
        from trtpipe import cuda

        with self._lock:
            cuda.set_device(self.device.index)
            staging = cuda.PinnedHostBuffer(dtype, shape)
            try:
                if staging.size:
                    cuda.memcpy_dtoh_async(staging.ptr, pointer, staging.nbytes, self._stream)
                    self._stream.synchronize()
                return staging.view(shape).copy()
            finally:
                staging.close()

    def upload(self, pointer: int, array: np.ndarray) -> None:
        """A host array -> device memory at ``pointer``, through a pinned buffer freed after."""
        from trtpipe import cuda

        with self._lock:
            cuda.set_device(self.device.index)
            staging = cuda.PinnedHostBuffer(array.dtype, array.shape)
            try:
                if staging.size:
                    np.copyto(staging.view(array.shape), array)
                    cuda.memcpy_htod_async(pointer, staging.ptr, staging.nbytes, self._stream)
                    self._stream.synchronize()
            finally:
                staging.close()


class TensorRTDecoderSession(DecoderSession):
    """Decoder steps on one GPU with ping-pong KV buffers (see the module docstring)."""

    def __init__(self, engine: EngineDir, device: Device):
        super().__init__(engine, device)
        self.runner = _StepRunner(engine, device, self.spec)
        self.past_ptr: dict[str, int] = {}
        self.present_ptr: dict[str, int] = {}
        self.batch = 0
        self.past_length = 0

    def load(self) -> None:
        self.runner.load()

    def memory_bytes(self) -> dict[str, int]:
        """Device buffers, pinned host and TensorRT activation bytes held (see the runner)."""
        return self.runner.memory_bytes()

    def start(self, batch: int) -> None:
        buffers = self.runner._device_buffers
        self.past_ptr = {c.past: buffers[c.past].ptr for c in self.spec.cache}
        self.present_ptr = {c.past: buffers[c.present].ptr for c in self.spec.cache}
        self.batch = batch
        self.past_length = 0

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> np.ndarray:
        new = int(input_ids.shape[1])
        if self.past_length + new > self.spec.max_total - 1:
            raise InputError(
                f"{self.past_length} cached + {new} new tokens exceed the engine's KV room of "
                f"{self.spec.max_total - 1} positions"
            )
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        if self.spec.has_position_ids:
            feeds["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        shapes: dict[str, tuple[int, ...]] = {
            c.past: (self.batch, c.heads, self.past_length, c.head_dim) for c in self.spec.cache
        }
        addresses: dict[str, int] = {}
        for c in self.spec.cache:
            addresses[c.past] = self.past_ptr[c.past]
            addresses[c.present] = self.present_ptr[c.past]
        logits = self.runner.step(feeds, shapes, addresses)
        # The present just written becomes the next step's past; the old past is reused.
        self.past_ptr, self.present_ptr = self.present_ptr, self.past_ptr
        self.past_length += new
        return logits

    def read_cache(self) -> list[np.ndarray]:
        """Host copies of the cache (staged through short-lived pinned buffers)."""
        return [
            self.runner.download(
                self.past_ptr[c.past],
                np.dtype(c.dtype),
                (self.batch, c.heads, self.past_length, c.head_dim),
            )
            for c in self.spec.cache
        ]

    def write_cache(self, arrays: list[np.ndarray]) -> None:
        """Replace the cache; batch and past length come from the arrays' shapes."""
        if len(arrays) != len(self.spec.cache) or not arrays:
            raise InputError(f"expected {len(self.spec.cache)} cache arrays, got {len(arrays)}")
        batch, _, past, _ = (int(d) for d in arrays[0].shape)
        if batch > self.spec.max_batch or past > self.spec.max_total - 1:
            raise InputError(
                f"cache of batch {batch} and length {past} exceeds the engine's room "
                f"({self.spec.max_batch} x {self.spec.max_total - 1})"
            )
        if not self.past_ptr:
            self.start(batch)
        for c, array in zip(self.spec.cache, arrays, strict=True):
            want = (batch, c.heads, past, c.head_dim)
            if tuple(array.shape) != want:
                raise InputError(f"cache array for {c.past} has shape {array.shape}, want {want}")
            host = np.ascontiguousarray(array, dtype=np.dtype(c.dtype))
            self.runner.upload(self.past_ptr[c.past], host)
        self.batch, self.past_length = batch, past

    def close(self) -> None:
        self.runner.close()
