"""The model repository: name -> served model, started and stopped together.

Encoder engines become :class:`ServedModel`; decoder engines (a KV cache in their inputs)
become generators that answer the generate / completions endpoints.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trtpipe.engine import EngineDir
from trtpipe.errors import InputError, TrtpipeError
from trtpipe.server.config import PoolFactory, ServeConfig, default_pool_factory
from trtpipe.server.errors import ModelNotFoundError, unknown_generation_model
from trtpipe.server.model_control import ModelControl, startup_models
from trtpipe.server.served_model import ServedModel


def parse_model_specs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """``ENGINE_DIR`` (named after the dir), a dir of engine dirs (named after their folders)
    or ``NAME=ENGINE_DIR``; names must be unique (trtpipe.server.model_dirs)."""
    from trtpipe.server.model_dirs import resolve_model_dirs

    return resolve_model_dirs(specs)


def unknown_model(name: str, hint: str) -> ModelNotFoundError:
    """Triton's wording first (its clients match on it), then trtpipe's hint."""
    return ModelNotFoundError(f"Request for unknown model: '{name}' is not found; {hint}")


def load_request(name: str) -> str:
    """The request that loads ``name`` (explicit model control), as the errors name it."""
    return f"POST /v2/repository/models/{name}/load"


def not_loaded(name: str) -> ModelNotFoundError:
    """A model in the repository that is not loaded (explicit model control)."""
    return unknown_model(
        name, f"it is in the repository but not loaded (load it: {load_request(name)})"
    )


class ModelRepository(ModelControl):
    """Name -> served model; starts and stops them together.

    With ``control_mode="explicit"`` models are loaded and unloaded by name at run time
    (:class:`trtpipe.server.model_control.ModelControl`, Triton's model control modes).
    """

    def __init__(
        self,
        models: list[ServedModel],
        generators: dict[str, Any] | None = None,
        available: dict[str, Path] | None = None,
        config: ServeConfig | None = None,
        pool_factory: PoolFactory = default_pool_factory,
        control_mode: str = "none",
    ):
        self.models = {m.name: m for m in models}
        # Decoder engines (KV cache) answer the generate / completions endpoints instead.
        self.generators: dict[str, Any] = dict(generators or {})
        self.init_control(available or {}, config or ServeConfig(), pool_factory, control_mode)
        # System shared memory regions (trtpipe.server.shared_memory); None: the extension is off.
        self.shared_memory: Any = None

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[str],
        config: ServeConfig,
        pool_factory: PoolFactory = default_pool_factory,
        control_mode: str = "none",
        load: Sequence[str] = (),
    ) -> ModelRepository:
        """Every engine of ``specs``; in explicit mode only those named in ``load`` (or "*")
        start loaded, as Triton's ``--load-model``."""
        from trtpipe.generation.kv_cache import is_decoder

        if not specs:
            raise InputError("give at least one ENGINE_DIR (or a dir of engine dirs) to serve")
        named = parse_model_specs(specs)
        initial = startup_models([n for n, _ in named], control_mode, load)
        models, generators = [], {}
        for name, path in named:
            engine = EngineDir(path)
            if name not in initial:
                continue
            if is_decoder(engine.manifest.inputs):
                from trtpipe.server.generation_model import ServedGeneration

                generators[name] = ServedGeneration.load(
                    name, engine, config.devices, config.generation(), config.threads_per_cpu_worker
                )
            else:
                models.append(ServedModel(name, engine, config, pool_factory))
        return cls(models, generators, dict(named), config, pool_factory, control_mode)

    def get(self, name: str, version: str | None = None) -> ServedModel:
        model = self.models.get(name)
        if model is None and name in self.generators:
            raise ModelNotFoundError(
                f"model {name!r} is a text-generation engine: use POST "
                f"/v2/models/{name}/generate, /v2/models/{name}/generate_stream or /v1/completions"
            )
        if model is None and name in self.available:
            raise not_loaded(name)
        if model is None:
            raise unknown_model(name, f"this server serves {self.names}")
        if version not in (None, "", model.version):
            raise ModelNotFoundError(
                f"Request for unknown model: '{name}' version {version} is not found; "
                f"available: [{model.version!r}]"
            )
        return model

    def missing_generation(self, name: str) -> ModelNotFoundError:
        """Why a generate or completions request naming ``name`` finds no generation model:
        an embedding or tensor model (loaded or not: loading it would not help), a decoder in
        the repository but not loaded, or none at all (404 each, as a tensor request naming a
        generation model gets)."""
        cannot = f"model {name!r} is not a text-generation engine"
        use = f"use POST /v2/models/{name}/infer or /v1/embeddings"
        if name in self.models:
            return ModelNotFoundError(f"{cannot}: {use}")
        if name in self.available and self._decoder_on_disk(name) is False:
            return ModelNotFoundError(
                f"{cannot}, and it is not loaded: {use} once it is loaded ({load_request(name)})"
            )
        if name in self.available:
            return not_loaded(name)
        return unknown_generation_model(name, sorted(self.generators))

    def _decoder_on_disk(self, name: str) -> bool | None:
        """Whether an unloaded model's engine is a decoder, from its manifest (read only on this
        error path); None where the manifest cannot be read."""
        from trtpipe.generation.kv_cache import is_decoder

        try:
            return is_decoder(EngineDir(self.available[name]).manifest.inputs)
        except (TrtpipeError, OSError):  # removed or broken since startup: the plain hint will do
            return None

    def describe(self, name: str, version: str | None = None) -> Any:
        """The model for the metadata, ready, config and stats documents: a tensor model or a
        generation model (``get`` refuses the latter, as v2 infer cannot run it)."""
        generation = self.generators.get(name)
        if generation is None:
            return self.get(name, version)
        if version not in (None, "", generation.version):
            raise ModelNotFoundError(
                f"Request for unknown model: '{name}' version {version} is not found; "
                f"available: [{generation.version!r}]"
            )
        return generation

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(list(self.models.values()))  # a load/unload may change the dict meanwhile

    @property
    def every_model(self) -> list[Any]:
        """Every served model: tensor models, then text-generation engines (their statistics
        and readiness documents list both)."""
        return [*self, *self.generators.values()]

    @property
    def names(self) -> list[str]:
        """Every served model: tensor models and text-generation engines."""
        return sorted([*self.models, *self.generators])

    @property
    def ready(self) -> bool:
        # Explicit model control: the server is ready with no model loaded, as Triton's is.
        served = bool(self.models) or bool(self.generators) or self.control_mode == "explicit"
        # A generation model being unloaded is not ready, the server still is.
        generation = all(
            g.ready for n, g in list(self.generators.items()) if n not in self._transitions
        )
        return served and generation and all(m.ready for m in list(self.models.values()))

    async def start(self) -> None:
        for model in self.models.values():
            await model.start()

    async def stop(self, drain: bool = True) -> None:
        await asyncio.gather(*(m.stop(drain) for m in self.models.values()), return_exceptions=True)
        if drain:  # running sequences finish; waiting and new ones get 503
            await asyncio.gather(*(asyncio.to_thread(g.drain) for g in self.generators.values()))
        for generator in self.generators.values():
            generator.close()
