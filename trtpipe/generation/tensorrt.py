"""TensorRT decoder stepping: the KV cache lives in device buffers that swap roles each step.

The runner allocates every I/O tensor for the profile maximum. For each layer, the
``past_key_values.N.*`` and ``present.N.*`` buffers take turns: a step reads the past from one
and writes the present into the other, then the two swap, so the cache never leaves the GPU.
Only input_ids / attention_mask / position_ids go host->device and only the last position's
logits come back, with one synchronize per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError, RunnerError
from trtpipe.generation.kv_cache import DecoderSession
from trtpipe.runners.tensorrt import TensorRTRunner


class _StepRunner(TensorRTRunner):
    """The TensorRT runner plus one decode step with caller-chosen cache addresses."""

    def step(
        self,
        feeds: dict[str, np.ndarray],
        cache_shapes: dict[str, tuple[int, ...]],
        addresses: dict[str, int],
    ) -> np.ndarray:
        from trtpipe import cuda

        with self._lock:
            if self._context is None:
                raise RunnerError(f"{self.describe()} was closed")
            cuda.set_device(self.device.index)
            context, stream = self._context, self._stream
            for name, array in feeds.items():
                device = self._upload_input(cuda, name, array)
                context.set_tensor_address(name, device.ptr)
            for name, shape in cache_shapes.items():
                if not context.set_input_shape(name, shape):
                    raise InputError(
                        f"KV cache {name!r} shape {list(shape)} is outside the profile"
                    )
            targets = {**addresses, "logits": self._device_buffers["logits"].ptr}
            for name, pointer in targets.items():
                if not context.set_tensor_address(name, pointer):
                    raise RunnerError(f"TensorRT rejected the address of tensor {name!r}")
            if not context.execute_async_v3(stream.handle):
                raise RunnerError(f"execute_async_v3 failed on {self.device}")
            batch, seq, vocab = (int(d) for d in context.get_tensor_shape("logits"))
            host = self._host_buffers["logits"]
            itemsize = host.dtype.itemsize
            row = vocab * itemsize
            # Copy back only the last position of every row.
            for b in range(batch if seq > 1 else 1):
                offset = ((b * seq) + seq - 1) * row
                count = row if seq > 1 else batch * row
                cuda.memcpy_dtoh_async(
                    host.ptr + b * row, self._device_buffers["logits"].ptr + offset, count, stream
                )
            stream.synchronize()
            return np.array(host.view((batch, vocab)), dtype=np.float32)


class TensorRTDecoderSession(DecoderSession):
    """Decoder steps on one GPU with ping-pong KV buffers (see the module docstring)."""

    def __init__(self, engine: EngineDir, device: Device):
        super().__init__(engine, device)
        self.runner = _StepRunner(engine, device)
        self.past_ptr: dict[str, int] = {}
        self.present_ptr: dict[str, int] = {}
        self.batch = 0
        self.past_length = 0

    def load(self) -> None:
        self.runner.load()
        buffers: dict[str, Any] = self.runner._device_buffers
        for c in self.spec.cache:
            # Each buffer must hold the longest present the loop can produce (max_total - 1).
            need = self.spec.max_batch * c.heads * (self.spec.max_total - 1) * c.head_dim
            need *= np.dtype(c.dtype).itemsize
            if min(buffers[c.past].nbytes, buffers[c.present].nbytes) < need:
                raise RunnerError(f"{c.past}: device buffers too small for the cache")

    def start(self, batch: int) -> None:
        buffers = self.runner._device_buffers
        self.past_ptr = {c.past: buffers[c.past].ptr for c in self.spec.cache}
        self.present_ptr = {c.past: buffers[c.present].ptr for c in self.spec.cache}
        self.batch = batch
        self.past_length = 0

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> np.ndarray:
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
        self.past_length += int(input_ids.shape[1])
        return logits

    def close(self) -> None:
        self.runner.close()
