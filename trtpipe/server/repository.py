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
from trtpipe.errors import InputError
from trtpipe.server.config import PoolFactory, ServeConfig, default_pool_factory
from trtpipe.server.errors import ModelNotFoundError
from trtpipe.server.served_model import ServedModel


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


def unknown_model(name: str, hint: str) -> ModelNotFoundError:
    """Triton's wording first (its clients match on it), then trtpipe's hint."""
    return ModelNotFoundError(f"Request for unknown model: '{name}' is not found; {hint}")


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
            raise unknown_model(name, f"this server serves {self.names}")
        if version not in (None, "", model.version):
            raise ModelNotFoundError(
                f"Request for unknown model: '{name}' version {version} is not found; "
                f"available: [{model.version!r}]"
            )
        return model

    def __iter__(self) -> Iterator[ServedModel]:
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
