"""One engine under one name: device pool + dynamic batcher, and what a request means for it.

The front ends (HTTP, gRPC) decode requests into :class:`InferRequest` and call
:meth:`ServedModel.infer` or :meth:`ServedModel.embed`. A tensor request is validated once by
:class:`TensorChecker`; a text request is tokenized by :class:`TextEncoder`; both go to the
batcher as already-validated rows. Documents (metadata, config, statistics) are built in
:mod:`trtpipe.server.documents` from this object's public facts.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import EngineDir, TensorSpec
from trtpipe.runtime.batch_hooks import BatchHooks, PaddingHooks
from trtpipe.runtime.padding import Layout
from trtpipe.server.config import PoolFactory, ServeConfig, default_pool_factory
from trtpipe.server.documents import (
    VERSION,
    Counter,
    model_config,
    model_metadata,
    model_statistics,
)
from trtpipe.server.errors import ModelNotReadyError
from trtpipe.server.protocol import InferRequest, ProtocolError
from trtpipe.server.text_input import (
    MASK_OUTPUT,
    POOLED_OUTPUT,
    TOKEN_OUTPUTS,
    TextEncoder,
    decode_texts,
    merge_rows,
    sentence_vectors,
)
from trtpipe.server.validation import TEXT_INPUT, TensorChecker, id_limits

log = logging.getLogger(__name__)

DEFAULT_TEXT_LENGTH = 512


class ServedModel:
    """One engine under one name: pool + batcher + optional tokenizer + request counters."""

    def __init__(
        self,
        name: str,
        engine: EngineDir,
        config: ServeConfig,
        pool_factory: PoolFactory = default_pool_factory,
    ):
        self.name = name
        self.version = VERSION
        self.engine = engine
        self.config = config
        self.manifest = engine.manifest
        self.pool = pool_factory(engine, config)
        self.batcher: Any = None
        self.started = False
        self.success = Counter()
        self.failure = Counter()
        self.last_inference_ms = 0
        self._lock = threading.Lock()
        self.checker: TensorChecker | None = None
        self.text: TextEncoder | None = None
        if self.is_text_model:
            self.text = TextEncoder(
                engine.path, self.inputs, self.max_sequence_length or DEFAULT_TEXT_LENGTH
            )

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm every device, start the batcher, load the tokenizer; then ready."""
        from trtpipe.runtime.batcher import BatcherConfig, DynamicBatcher

        await asyncio.to_thread(self.pool.start)
        if self.text is not None:
            await asyncio.to_thread(self.text.load)
        bucket_multiple, max_padding_share = self.config.padding_rule()
        self.batcher = DynamicBatcher(
            self.pool,
            BatcherConfig(
                max_batch_size=self.config.max_batch_size,
                max_queue_delay_ms=self.config.max_queue_delay_ms,
                max_queue_size=self.config.max_queue_size,
                timeout_s=self.config.timeout_s,
                bucket_multiple=bucket_multiple,
                max_padding_share=max_padding_share,
                learn_launch_cost=self.config.learn_launch_cost,
            ),
            hooks=self._batch_hooks,
        )
        await self.batcher.start()
        self.checker = TensorChecker(
            self.name,
            self.inputs,
            self.pool.profile,
            self.max_batch_size,
            id_limits(self.engine.path),
            text_model=self.is_text_model,
        )
        self.started = True
        log.info("model %s ready on %s", self.name, [str(d) for d in self.config.encoder_devices()])

    def _batch_hooks(self, layout: Layout) -> BatchHooks:
        """Pad token ids with the tokenizer's pad id (0 without a tokenizer), masks with 0."""
        pad_ids = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}
        if self.text is not None and self.text.pad_id is not None:
            pad_ids["input_ids"] = self.text.pad_id
        return PaddingHooks(layout, pad_ids)

    async def stop(self, drain: bool = True) -> None:
        self.started = False
        if self.batcher is not None:
            await self.batcher.stop(drain=drain)
        await asyncio.to_thread(self.pool.close)

    @property
    def ready(self) -> bool:
        return self.started and bool(self.pool.ready)

    # -- shape facts ------------------------------------------------------------------------------
    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self.pool.inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self.pool.outputs)

    @property
    def max_batch_size(self) -> int:
        """Rows per launch: the batcher's figure once started, else engine max capped by config."""
        if self.batcher is not None and self.batcher.max_batch_size:
            return int(self.batcher.max_batch_size)
        engine_max = int(self.pool.max_batch_size)
        if self.config.max_batch_size:
            return min(engine_max, self.config.max_batch_size)
        return engine_max

    @property
    def max_sequence_length(self) -> int | None:
        """Longest sequence the profile allows (dim 1 of token inputs), None if not a text model."""
        lengths = [r.max[1] for n, r in self.pool.profile.items() if len(r.max) == 2]
        return min(lengths) if lengths else None

    @functools.cached_property
    def is_text_model(self) -> bool:
        names = {s.name for s in self.inputs}
        return "input_ids" in names and self.engine.has_tokenizer()

    @functools.cached_property
    def is_embedding_model(self) -> bool:
        names = {s.name for s in self.outputs}
        return self.is_text_model and (
            POOLED_OUTPUT in names or any(n in names for n in TOKEN_OUTPUTS)
        )

    # -- protocol documents (trtpipe.server.documents) ---------------------------------------
    def metadata(self) -> dict[str, Any]:
        return model_metadata(self)

    def model_config(self) -> dict[str, Any]:
        return model_config(self)

    def statistics(self) -> dict[str, Any]:
        return model_statistics(self)

    # -- statistics -------------------------------------------------------------------------------
    def batcher_stats(self) -> dict[str, Any]:
        """The batcher's counters as a dict (empty before start)."""
        if self.batcher is None:
            return {}
        data: dict[str, Any] = self.batcher.stats.to_dict()
        data["launch_overhead_positions"] = self.batcher.launch_costs.overhead_positions()
        return data

    @property
    def pending(self) -> int:
        """Requests accepted and not yet on a device: queued, plus the rows of the batch
        prepared ahead of the devices (one row per request for batch-1 traffic)."""
        if self.batcher is None:
            return 0
        return int(self.batcher.pending) + int(self.pool.waiting_rows)

    def devices_status(self) -> list[dict[str, Any]]:
        return [
            {k: (str(v) if isinstance(v, Device) else v) for k, v in status.items()}
            for status in self.pool.devices_status()
        ]

    def record(self, ok: bool, started_ns: int) -> None:
        elapsed = time.perf_counter_ns() - started_ns
        with self._lock:
            (self.success if ok else self.failure).add(elapsed)
            if ok:
                self.last_inference_ms = int(time.time() * 1000)

    # -- inference --------------------------------------------------------------------------------
    def _running_batcher(self) -> Any:
        if not self.ready or self.batcher is None:
            raise ModelNotReadyError(f"model {self.name!r} is not ready (no healthy device)")
        return self.batcher

    async def infer(self, request: InferRequest) -> dict[str, np.ndarray]:
        """Run one decoded request; every output the engine produces (plus the text mask)."""
        batcher = self._running_batcher()
        text = request.input(TEXT_INPUT)
        if text is not None and TEXT_INPUT not in {s.name for s in self.inputs}:
            if len(request.inputs) != 1:
                raise ProtocolError(
                    f"a {TEXT_INPUT!r} request must not carry other inputs "
                    f"(got {[t.name for t in request.inputs]})"
                )
            if text.datatype != "BYTES":
                raise ProtocolError(
                    f"input {TEXT_INPUT!r} has datatype {text.datatype}; text is sent as BYTES"
                )
            truncate = bool(request.parameters.get("truncation", True))
            wanted = None if request.outputs is None else {o.name for o in request.outputs}
            return await self.infer_texts(decode_texts(text.data), truncate, wanted)
        assert self.checker is not None
        feeds = self.checker.check(request)
        result: dict[str, np.ndarray] = await batcher.submit(feeds, validated=True)
        return result

    def encode_texts(self, texts: list[str], truncate: bool) -> list[dict[str, np.ndarray]]:
        if self.text is None:
            raise ProtocolError(
                f"model {self.name!r} has no tokenizer/input_ids; send tensors, not text"
            )
        return self.text.encode(texts, truncate)

    async def run_rows(self, rows: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Each row through the batcher on its own, so rows batch with other requests."""
        batcher = self._running_batcher()
        if len(rows) == 1:
            return [await batcher.submit(rows[0], validated=True)]
        tasks = [asyncio.ensure_future(batcher.submit(feeds, validated=True)) for feeds in rows]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _encode(self, texts: list[str], truncate: bool) -> list[dict[str, np.ndarray]]:
        # Small requests tokenize on the loop (cheaper than a thread hop); large ones off it.
        if len(texts) > 16 or sum(len(t) for t in texts) > 8192:
            return await asyncio.to_thread(self.encode_texts, texts, truncate)
        return self.encode_texts(texts, truncate)

    async def infer_texts(
        self, texts: list[str], truncate: bool, wanted: set[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Every output (or only ``wanted`` ones, when all exist) plus the text mask."""
        rows = await self._encode(texts, truncate)
        results = await self.run_rows(rows)
        lengths = [int(r["input_ids"].shape[1]) for r in rows]
        outputs = self.outputs
        if wanted is not None and wanted <= {s.name for s in outputs} | {MASK_OUTPUT}:
            outputs = [s for s in outputs if s.name in wanted]  # skip merging unwanted ones
        return merge_rows(outputs, results, lengths)

    async def embed(self, texts: list[str]) -> tuple[list[np.ndarray], int]:
        """Sentence embeddings (engine pooled output, else masked mean + L2) and token count."""
        if not self.is_embedding_model:
            raise ProtocolError(
                f"model {self.name!r} is a {self.manifest.task} engine without token or sentence "
                "embeddings; /v1/embeddings needs a feature-extraction engine"
            )
        rows = await self._encode(texts, True)
        results = await self.run_rows(rows)
        tokens = sum(int(r["input_ids"].shape[1]) for r in rows)
        return sentence_vectors(self.outputs, rows, results), tokens
