"""The models a server serves: engine dir + device pool + dynamic batcher under one name.

The front ends (HTTP, gRPC) decode requests into :class:`InferRequest` and call
:meth:`ServedModel.infer`; this module owns what a request means for an engine (the tensor path,
the server-side text path, embeddings) and the per-model statistics. It knows nothing about
devices beyond what the pool reports.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import EngineDir, TensorSpec
from trtpipe.errors import InputError
from trtpipe.server.documents import (
    TEXT_INPUT,
    VERSION,
    Counter,
    model_config,
    model_metadata,
    model_statistics,
)
from trtpipe.server.protocol import InferRequest, ProtocolError, v2_datatype
from trtpipe.text import feeds_from_encoding

log = logging.getLogger(__name__)

MASK_OUTPUT = "attention_mask"
POOLED_OUTPUT = "sentence_embedding"
TOKEN_OUTPUTS = ("token_embeddings", "last_hidden_state")


class ModelNotFoundError(InputError):
    """Unknown model or version (HTTP 404, gRPC NOT_FOUND)."""


class ModelNotReadyError(InputError):
    """The model has no healthy device (HTTP 503, gRPC UNAVAILABLE)."""


@dataclass
class ServeConfig:
    """How every model is served (the ``trtpipe serve`` options that are not about sockets)."""

    devices: list[Device] = field(default_factory=lambda: [Device("cpu", 0)])
    policy: str = "round_robin"
    retry_on_failure: bool = True
    max_batch_size: int | None = None
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024
    timeout_s: float = 30.0


PoolFactory = Callable[[EngineDir, ServeConfig], Any]


def default_pool_factory(engine: EngineDir, config: ServeConfig) -> Any:
    from trtpipe.runtime.pool import DevicePool

    return DevicePool.for_engine(
        engine, config.devices, policy=config.policy, retry_on_failure=config.retry_on_failure
    )


def parse_model_specs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """``ENGINE_DIR`` (named after the dir) or ``NAME=ENGINE_DIR``; names must be unique."""
    named: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if not name or "/" in name or not path:
            raise InputError(f"bad model spec {spec!r}: use ENGINE_DIR or NAME=ENGINE_DIR")
        named.append((name, Path(path)))
    names = [n for n, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(
            f"model name(s) {duplicates} given twice; name them with --name NAME=ENGINE_DIR"
        )
    return named


class ServedModel:
    """One engine under one name: pool + batcher + optional tokenizer + statistics."""

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
        self._tokenizer: Any = None

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        from trtpipe.runtime.batcher import BatcherConfig, DynamicBatcher

        await asyncio.to_thread(self.pool.start)
        self.batcher = DynamicBatcher(
            self.pool,
            BatcherConfig(
                max_batch_size=self.config.max_batch_size,
                max_queue_delay_ms=self.config.max_queue_delay_ms,
                max_queue_size=self.config.max_queue_size,
                timeout_s=self.config.timeout_s,
            ),
        )
        await self.batcher.start()
        if self.is_text_model:
            await asyncio.to_thread(self.tokenizer)
        self.started = True
        log.info("model %s ready on %s", self.name, [str(d) for d in self.config.devices])

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

    @property
    def is_text_model(self) -> bool:
        names = {s.name for s in self.inputs}
        return "input_ids" in names and self.engine.has_tokenizer()

    @property
    def is_embedding_model(self) -> bool:
        names = {s.name for s in self.outputs}
        return self.is_text_model and (
            POOLED_OUTPUT in names or any(n in names for n in TOKEN_OUTPUTS)
        )

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from trtpipe.text import load_tokenizer

            self._tokenizer = load_tokenizer(str(self.engine.path))
        return self._tokenizer

    # -- protocol documents (trtpipe.server.documents) ---------------------------------------
    def metadata(self) -> dict[str, Any]:
        return model_metadata(self)

    def model_config(self) -> dict[str, Any]:
        return model_config(self)

    def statistics(self) -> dict[str, Any]:
        return model_statistics(self)

    def batcher_stats(self) -> dict[str, Any]:
        """The batcher's counters as a dict (empty before start)."""
        if self.batcher is None:
            return {}
        data: dict[str, Any] = self.batcher.stats.to_dict()
        return data

    @property
    def pending(self) -> int:
        return int(self.batcher.pending) if self.batcher is not None else 0

    def devices_status(self) -> list[dict[str, Any]]:
        return [
            {k: (str(v) if isinstance(v, Device) else v) for k, v in status.items()}
            for status in self.pool.devices_status()
        ]

    # -- inference --------------------------------------------------------------------------------
    def record(self, ok: bool, started_ns: int) -> None:
        elapsed = time.perf_counter_ns() - started_ns
        with self._lock:
            (self.success if ok else self.failure).add(elapsed)
            if ok:
                self.last_inference_ms = int(time.time() * 1000)

    async def infer(self, request: InferRequest) -> dict[str, np.ndarray]:
        """Run one decoded request; every output the engine produces (plus the text mask)."""
        if not self.ready or self.batcher is None:
            raise ModelNotReadyError(f"model {self.name!r} is not ready (no healthy device)")
        text = request.input(TEXT_INPUT)
        if text is not None and not any(s.name == TEXT_INPUT for s in self.inputs):
            if len(request.inputs) != 1:
                raise ProtocolError(
                    f"a {TEXT_INPUT!r} request must not carry other inputs "
                    f"(got {[t.name for t in request.inputs]})"
                )
            truncate = bool(request.parameters.get("truncation", True))
            return await self.infer_texts(decode_texts(text.data), truncate)
        feeds = self.check_tensors(request)
        result: dict[str, np.ndarray] = await self.batcher.submit(feeds)
        return result

    def check_tensors(self, request: InferRequest) -> dict[str, np.ndarray]:
        """Names, datatypes, ranks, batch and sequence limits, with messages that say which."""
        specs = {s.name: s for s in self.inputs}
        feeds: dict[str, np.ndarray] = {}
        for tensor in request.inputs:
            spec = specs.get(tensor.name)
            if spec is None:
                hint = f" (or a single BYTES input {TEXT_INPUT!r})" if self.is_text_model else ""
                raise ProtocolError(
                    f"unknown input {tensor.name!r} for model {self.name!r}; it takes "
                    f"{sorted(specs)}{hint}"
                )
            want = v2_datatype(spec.dtype)
            if tensor.datatype != want:
                raise ProtocolError(
                    f"input {tensor.name!r} has datatype {tensor.datatype}, model {self.name!r} "
                    f"expects {want}"
                )
            if len(tensor.shape) != len(spec.shape):
                raise ProtocolError(
                    f"input {tensor.name!r} has shape {tensor.shape}, model {self.name!r} "
                    f"expects rank {len(spec.shape)} ({spec.shape}, -1 = any)"
                )
            for axis, (got, fixed) in enumerate(zip(tensor.shape, spec.shape, strict=True)):
                if fixed >= 0 and got != fixed:
                    raise ProtocolError(
                        f"input {tensor.name!r} dim {axis} is {got}, model {self.name!r} "
                        f"requires {fixed}"
                    )
            self.check_limits(tensor.name, tensor.shape)
            feeds[tensor.name] = tensor.data
        missing = sorted(set(specs) - set(feeds))
        if missing:
            raise ProtocolError(f"missing input(s) {missing} for model {self.name!r}")
        for name, limit in self.id_limits.items():
            values = feeds.get(name)
            if values is not None and values.size and (values.min() < 0 or values.max() >= limit):
                # An id outside the embedding table crashes the kernel (or reads out of bounds
                # on a GPU) and would fail every request batched with this one.
                raise ProtocolError(
                    f"input {name!r} holds values outside 0..{limit - 1} "
                    f"(model {self.name!r} has {limit} entries)"
                )
        return feeds

    @functools.cached_property
    def id_limits(self) -> dict[str, int]:
        """Embedding-table sizes from the engine's config.json: ids must stay below them."""
        try:
            config = json.loads((self.engine.path / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        limits = {
            "input_ids": config.get("vocab_size"),
            "token_type_ids": config.get("type_vocab_size"),
        }
        return {k: int(v) for k, v in limits.items() if isinstance(v, int) and v > 0}

    def check_limits(self, name: str, shape: list[int]) -> None:
        shape_range = self.pool.profile.get(name)
        if shape_range is None or len(shape_range.max) != len(shape):
            return
        if shape and shape[0] > self.max_batch_size:
            raise ProtocolError(
                f"input {name!r} has batch size {shape[0]}, model {self.name!r} accepts at most "
                f"{self.max_batch_size} per request"
            )
        for axis in range(1, len(shape)):
            low, high = shape_range.min[axis], shape_range.max[axis]
            if not low <= shape[axis] <= high:
                what = "sequence length" if axis == 1 else f"dim {axis}"
                raise ProtocolError(
                    f"input {name!r} has {what} {shape[axis]}, model {self.name!r} accepts "
                    f"{low}..{high} (rebuild with a larger profile, or send shorter input)"
                )

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], truncate: bool) -> list[dict[str, np.ndarray]]:
        """One feed dict per text, each at its own length (the batcher pads across requests)."""
        if not self.is_text_model:
            raise ProtocolError(
                f"model {self.name!r} has no tokenizer/input_ids; send tensors, not text"
            )
        if not texts:
            raise ProtocolError("no text given")
        max_len = self.max_sequence_length or 512
        encoded = self.tokenizer()(
            texts, padding=False, truncation=truncate, max_length=max_len if truncate else None
        )
        rows: list[dict[str, np.ndarray]] = []
        ids_rows = encoded["input_ids"]
        for index, ids in enumerate(ids_rows):
            if len(ids) > max_len:
                raise ProtocolError(
                    f"text {index} is {len(ids)} tokens, model {self.name!r} accepts at most "
                    f"{max_len} (send shorter text or allow truncation)"
                )
            row = {key: [values[index]] for key, values in encoded.items()}
            rows.append(feeds_from_encoding(row, self.inputs))
        return rows

    async def run_rows(self, rows: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Each row through the batcher on its own, so rows batch with other requests."""
        if not self.ready or self.batcher is None:
            raise ModelNotReadyError(f"model {self.name!r} is not ready (no healthy device)")
        tasks = [asyncio.ensure_future(self.batcher.submit(feeds)) for feeds in rows]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def infer_texts(self, texts: list[str], truncate: bool) -> dict[str, np.ndarray]:
        rows = await asyncio.to_thread(self.tokenize, texts, truncate)
        results = await self.run_rows(rows)
        lengths = [int(r["input_ids"].shape[1]) for r in rows]
        longest = max(lengths)
        outputs: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            parts = [
                own_tokens(res[spec.name], spec, n) for res, n in zip(results, lengths, strict=True)
            ]
            outputs[spec.name] = stack_padded(parts, spec, longest)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for index, length in enumerate(lengths):
            mask[index, :length] = 1
        outputs[MASK_OUTPUT] = mask
        return outputs

    async def embed(self, texts: list[str]) -> tuple[list[np.ndarray], int]:
        """Sentence embeddings (engine pooled output, else masked mean + L2) and token count."""
        if not self.is_embedding_model:
            raise ProtocolError(
                f"model {self.name!r} is a {self.manifest.task} engine without token or sentence "
                "embeddings; /v1/embeddings needs a feature-extraction engine"
            )
        rows = await asyncio.to_thread(self.tokenize, texts, True)
        results = await self.run_rows(rows)
        names = {s.name for s in self.outputs}
        vectors: list[np.ndarray] = []
        tokens = 0
        for feeds, result in zip(rows, results, strict=True):
            length = int(feeds["input_ids"].shape[1])
            tokens += length
            if POOLED_OUTPUT in names:
                vectors.append(np.asarray(result[POOLED_OUTPUT][0], dtype=np.float32))
                continue
            token_name = next(n for n in TOKEN_OUTPUTS if n in names)
            hidden = np.asarray(result[token_name][0, :length], dtype=np.float32)
            mask = feeds.get("attention_mask", np.ones((1, length)))[0, :length].astype(np.float32)
            pooled = (hidden * mask[:, None]).sum(axis=0) / max(float(mask.sum()), 1e-9)
            vectors.append(pooled / max(float(np.linalg.norm(pooled)), 1e-12))
        return vectors, tokens


def decode_texts(data: np.ndarray) -> list[str]:
    texts = []
    for index, item in enumerate(np.asarray(data, dtype=object).ravel()):
        try:
            texts.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError:
            raise ProtocolError(f"text {index} is not valid UTF-8") from None
    return texts


def own_tokens(array: np.ndarray, spec: TensorSpec, length: int) -> np.ndarray:
    """A per-token output cut to the row's own tokens (whatever padding the batch used)."""
    if is_sequence_output(spec) and array.ndim >= 2:
        return array[:, :length]
    return array


def stack_padded(parts: list[np.ndarray], spec: TensorSpec, longest: int) -> np.ndarray:
    if not is_sequence_output(spec):
        return np.concatenate(parts, axis=0)
    first = parts[0]
    out = np.zeros((len(parts), longest, *first.shape[2:]), dtype=first.dtype)
    for index, part in enumerate(parts):
        out[index, : part.shape[1]] = part[0]
    return out


def is_sequence_output(spec: TensorSpec) -> bool:
    return len(spec.dims) >= 2 and spec.dims[1] == "sequence"


class ModelRepository:
    """Name -> served model; starts and stops them together."""

    def __init__(self, models: list[ServedModel], generators: dict[str, Any] | None = None):
        self.models = {m.name: m for m in models}
        # Decoder engines (KV cache) answer the generate / completions endpoints instead.
        self.generators: dict[str, Any] = dict(generators or {})

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[str],
        config: ServeConfig,
        pool_factory: PoolFactory = default_pool_factory,
    ) -> ModelRepository:
        from trtpipe.generation.kv_cache import is_decoder

        if not specs:
            raise InputError("give at least one ENGINE_DIR to serve")
        models, generators = [], {}
        for name, path in parse_model_specs(specs):
            engine = EngineDir(path)
            if is_decoder(engine.manifest.inputs):
                from trtpipe.generation.generator import Generator

                generators[name] = Generator(engine, config.devices)
            else:
                models.append(ServedModel(name, engine, config, pool_factory))
        return cls(models, generators)

    def get(self, name: str, version: str | None = None) -> ServedModel:
        model = self.models.get(name)
        if model is None and name in self.generators:
            raise ModelNotFoundError(
                f"model {name!r} is a text-generation engine: use POST "
                f"/v2/models/{name}/generate, /v2/models/{name}/generate_stream or /v1/completions"
            )
        if model is None:
            raise ModelNotFoundError(f"unknown model {name!r}; this server serves {self.names}")
        if version not in (None, "", model.version):
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r}; available: [{model.version!r}]"
            )
        return model

    def __iter__(self) -> Any:
        return iter(self.models.values())

    @property
    def names(self) -> list[str]:
        """Every served model: tensor models and text-generation engines."""
        return sorted([*self.models, *self.generators])

    @property
    def ready(self) -> bool:
        served = bool(self.models) or bool(self.generators)
        return served and all(m.ready for m in self.models.values())

    async def start(self) -> None:
        for model in self.models.values():
            await model.start()

    async def stop(self, drain: bool = True) -> None:
        await asyncio.gather(*(m.stop(drain) for m in self.models.values()), return_exceptions=True)
        for generator in self.generators.values():
            generator.close()
