"""Loading and unloading models by name at run time (KServe/Triton repository extension).

Triton's model control modes, spelled as Triton spells them: ``none`` serves every model given
at startup and refuses load/unload; ``explicit`` starts with the models named by
``--load-model`` (``*`` for all) and loads or unloads any model of the repository on request.

A load builds the model beside the running one and swaps it in only once it is warm and ready
(so a reload never drops requests); an unload takes the model out of the name table first (new
requests get Triton's unknown-model error), then drains it: every request already queued or
running in its batcher completes before its devices are released.

Text-generation engines (a KV cache in their inputs) load and unload the same way, as a
``ServedGeneration``. Their unload drains as SIGTERM does: the model stays in the table while
its running sequences stream to their end, new requests for it are refused with 503 /
UNAVAILABLE (``ModelNotReadyError``: the model is being unloaded) and the queued ones with
``BatcherStoppedError`` (503); then its schedulers' threads end and its sessions are closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trtpipe.errors import InputError, TrtpipeError
from trtpipe.server import heap
from trtpipe.server.config import PoolFactory, ServeConfig
from trtpipe.server.errors import ModelNotFoundError

log = logging.getLogger(__name__)

CONTROL_MODES = ("none", "explicit")
ALL_MODELS = "*"


class ModelControlError(InputError):
    """A load/unload the mode or the model does not allow (HTTP 400, gRPC INVALID_ARGUMENT)."""


class ModelLoadError(TrtpipeError):
    """The engine dir could not be loaded (HTTP 500, gRPC INTERNAL); the message says why."""


def startup_models(names: list[str], control_mode: str, load: Sequence[str]) -> set[str]:
    """The models loaded at startup: all in mode none; in explicit mode those in ``load``."""
    if control_mode not in CONTROL_MODES:
        raise InputError(f"unknown model control mode {control_mode!r}; use none or explicit")
    if control_mode == "none":
        if load:
            raise InputError("--load-model needs --model-control-mode explicit")
        return set(names)
    if ALL_MODELS in load:
        return set(names)
    unknown = sorted(set(load) - set(names))
    if unknown:
        raise InputError(f"--load-model {unknown}: not in the repository, which holds {names}")
    return set(load)


class ModelControl:
    """Mixin of :class:`~trtpipe.server.repository.ModelRepository`: index, load, unload."""

    models: dict[str, Any]
    generators: dict[str, Any]

    def init_control(
        self,
        available: dict[str, Path],
        config: ServeConfig,
        pool_factory: PoolFactory,
        control_mode: str,
    ) -> None:
        if control_mode not in CONTROL_MODES:
            raise InputError(f"unknown model control mode {control_mode!r}; use none or explicit")
        # Every engine dir the repository may serve, loaded or not.
        self.available: dict[str, Path] = {**available}
        for name, model in self.models.items():
            self.available.setdefault(name, Path(model.engine.path))
        for name, generation in self.generators.items():
            self.available.setdefault(name, Path(generation.generator.engine.path))
        self.control_mode = control_mode
        self._serve_config = config
        self._pool_factory = pool_factory
        self._transitions: dict[str, str] = {}  # name -> LOADING / UNLOADING
        self._locks: dict[str, asyncio.Lock] = {}

    # -- index -----------------------------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """name, version, state (READY / UNAVAILABLE / LOADING / UNLOADING), reason: every model
        of the repository, loaded or not, as Triton's repository index lists them."""
        entries = []
        for name in sorted({*self.available, *self.models, *self.generators}):
            model = self.models.get(name)
            if name in self._transitions:
                state, reason = self._transitions[name], ""
            elif model is not None:
                state = "READY" if model.ready else "UNAVAILABLE"
                reason = "" if model.ready else "no healthy device"
            elif name in self.generators:
                ready = self.generators[name].ready
                state = "READY" if ready else "UNAVAILABLE"
                reason = "" if ready else "no healthy device"
            else:
                state, reason = "UNAVAILABLE", "unloaded"
            version = str(getattr(model, "version", "1"))
            entry = {"name": name, "version": version, "state": state}
            if reason:  # as the gRPC index renders it: no empty reason
                entry["reason"] = reason
            entries.append(entry)
        return [e for e in entries if e["state"] == "READY"] if ready_only else entries

    # -- load / unload ---------------------------------------------------------------------------
    def _check_control(self, action: str, name: str) -> None:
        if self.control_mode != "explicit":
            raise ModelControlError(
                f"explicit model {action} is not allowed: the server runs with model control "
                "mode none (start it with --model-control-mode explicit)"
            )
        if name not in self.available:
            raise ModelNotFoundError(
                f"Request for unknown model: '{name}' is not found; the repository holds "
                f"{sorted(self.available)}"
            )

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str) -> None:
        """Load (or reload) ``name`` from its engine dir; returns once it is ready. A decoder
        engine becomes a generation model, any other a tensor model."""
        from trtpipe.engine import EngineDir
        from trtpipe.generation.kv_cache import is_decoder

        self._check_control("load", name)
        async with self._lock(name):
            self._transitions[name] = "LOADING"
            try:
                try:
                    engine = await asyncio.to_thread(EngineDir, self.available[name])
                except TrtpipeError:
                    raise
                except Exception as exc:
                    raise ModelLoadError(f"failed to load {name!r}: {exc}") from exc
                if is_decoder(engine.manifest.inputs):
                    loaded, table = await self._load_generation(name, engine), self.generators
                else:
                    loaded, table = await self._load_tensor_model(name, engine), self.models
            finally:
                self._transitions.pop(name, None)
            # Swap in one step of the event loop: no request sees the name missing.
            previous = [t.pop(name) for t in (self.models, self.generators) if name in t]
            table[name] = loaded
            while previous:  # a reload: the old one drains after the swap (and is let go)
                reason = f"model {name!r} was reloaded; send the request again"
                await _retire(previous.pop(), reason)
        heap.refreeze()
        log.info("model %s loaded from %s", name, self.available[name])

    async def _load_tensor_model(self, name: str, engine: Any) -> Any:
        from trtpipe.server.served_model import ServedModel

        model = None
        try:
            model = await asyncio.to_thread(
                ServedModel, name, engine, self._serve_config, self._pool_factory
            )
            await model.start()
            if not model.ready:
                raise ModelLoadError(f"failed to load {name!r}: no device became healthy")
        except BaseException as exc:
            if model is not None:
                await model.stop(drain=False)
            if isinstance(exc, TrtpipeError) or not isinstance(exc, Exception):
                raise
            raise ModelLoadError(f"failed to load {name!r}: {exc}") from exc
        return model

    async def _load_generation(self, name: str, engine: Any) -> Any:
        """A continuous-batching generation model on the configured devices."""
        from trtpipe.server.generation_model import ServedGeneration

        config = self._serve_config
        try:
            served = await asyncio.to_thread(
                ServedGeneration.load,
                name,
                engine,
                config.devices,
                config.generation(),
                config.threads_per_cpu_worker,
            )
        except TrtpipeError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"failed to load {name!r}: {exc}") from exc
        if not served.ready:
            await asyncio.to_thread(served.close)
            raise ModelLoadError(f"failed to load {name!r}: no scheduler started")
        return served

    async def unload(self, name: str) -> None:
        """Take ``name`` out of service, then finish what it already accepted and free it.

        A tensor model leaves the name table at once (Triton's unknown-model error); a
        generation model stays in it, not ready, while its running sequences finish (new
        requests: 503), as a SIGTERM drains it."""
        self._check_control("unload", name)
        async with self._lock(name):
            model = self.models.pop(name, None) or self.generators.get(name)
            if model is None:
                return  # unloading an unloaded model is not an error (Triton)
            self._transitions[name] = "UNLOADING"
            try:
                await _retire(model, f"model {name!r} is being unloaded; it takes no new requests")
            finally:
                if self.generators.get(name) is model:
                    del self.generators[name]
                self._transitions.pop(name, None)
            del model
            heap.refreeze()
        log.info("model %s unloaded", name)


async def _retire(model: Any, reason: str) -> None:
    """Drain ``model`` and free it: a tensor model's batcher completes what it queued; a
    generation model refuses new requests with ``reason`` (503), finishes its running
    sequences, refuses its queue, then closes its schedulers and sessions."""
    from trtpipe.server.served_model import ServedModel

    if isinstance(model, ServedModel):
        await model.stop(drain=True)
        return
    try:
        await asyncio.to_thread(model.drain, None, reason)
    finally:
        await asyncio.to_thread(model.close)
