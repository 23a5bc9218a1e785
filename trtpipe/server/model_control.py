"""Loading and unloading models by name at run time (KServe/Triton repository extension).

Triton's model control modes, spelled as Triton spells them: ``none`` serves every model given
at startup and refuses load/unload; ``explicit`` starts with the models named by
``--load-model`` (``*`` for all) and loads or unloads any model of the repository on request.

A load builds the model beside the running one and swaps it in only once it is warm and ready
(so a reload never drops requests); an unload takes the model out of the name table first (new
requests get Triton's unknown-model error), then drains it: every request already queued or
running in its batcher completes before its devices are released.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trtpipe.errors import InputError, TrtpipeError
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
                state, reason = "READY", ""
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
        if name in self.generators:
            raise ModelControlError(
                f"model {name!r} is a text-generation engine: it cannot be loaded or unloaded at "
                "run time (serve it from startup)"
            )

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str) -> None:
        """Load (or reload) ``name`` from its engine dir; returns once it is ready."""
        from trtpipe.engine import EngineDir
        from trtpipe.generation.kv_cache import is_decoder
        from trtpipe.server.served_model import ServedModel

        self._check_control("load", name)
        async with self._lock(name):
            self._transitions[name] = "LOADING"
            model = None
            try:
                engine = await asyncio.to_thread(EngineDir, self.available[name])
                if is_decoder(engine.manifest.inputs):
                    raise ModelControlError(
                        f"model {name!r} is a text-generation engine: it cannot be loaded at run "
                        "time (serve it from startup)"
                    )
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
            finally:
                self._transitions.pop(name, None)
            previous = self.models.get(name)
            self.models[name] = model
            if previous is not None:  # a reload: the old one drains after the swap
                await previous.stop(drain=True)
        log.info("model %s loaded from %s", name, self.available[name])

    async def unload(self, name: str) -> None:
        """Take ``name`` out of service, then finish what it already accepted and free it."""
        self._check_control("unload", name)
        async with self._lock(name):
            model = self.models.pop(name, None)
            if model is None:
                return  # unloading an unloaded model is not an error (Triton)
            self._transitions[name] = "UNLOADING"
            try:
                await model.stop(drain=True)
            finally:
                self._transitions.pop(name, None)
        log.info("model %s unloaded", name)
