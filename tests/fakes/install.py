"""Install the TEST DOUBLES as ``tensorrt`` and ``cuda.bindings.runtime`` for one test.

``fake_gpu`` puts the fakes into ``sys.modules`` (with ``cuda`` and ``cuda.bindings`` package
stand-ins), resets their state, yields a handle for assertions, and restores whatever modules
were there before (the real cuda-python stays installed for other tests).

Test modules wrap :func:`installed_fakes` in a local fixture (importing ``fake_gpu`` into a
module would shadow it in every test signature), or use ``fake_gpu`` as a plugin fixture.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fakes import cuda_runtime
from tests.fakes import tensorrt as fake_tensorrt


@dataclass
class FakeGpu:
    """Handles on the installed fakes: ``cuda.STATE`` counters, ``trt.STATS``."""

    cuda: Any
    trt: Any

    @property
    def state(self) -> cuda_runtime.State:
        return self.cuda.STATE

    def leaks(self) -> dict[str, int]:
        return self.cuda.STATE.leaks()


def _owned(name: str) -> bool:
    return name in ("tensorrt", "cuda") or name.startswith(("tensorrt.", "cuda."))


@contextlib.contextmanager
def installed_fakes(
    device_count: int = 1, capability: tuple[int, int] = (9, 0), version: str = "10.13.3.9"
) -> Iterator[FakeGpu]:
    cuda_runtime.STATE = cuda_runtime.State(device_count, capability)
    fake_tensorrt.reset(version)
    saved = {name: module for name, module in sys.modules.items() if _owned(name)}
    for name in saved:
        del sys.modules[name]
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.__path__ = []
    bindings = types.ModuleType("cuda.bindings")
    bindings.__path__ = []
    bindings.runtime = cuda_runtime  # type: ignore[attr-defined]
    cuda_pkg.bindings = bindings  # type: ignore[attr-defined]
    sys.modules.update(
        {
            "cuda": cuda_pkg,
            "cuda.bindings": bindings,
            "cuda.bindings.runtime": cuda_runtime,
            "tensorrt": fake_tensorrt,
        }
    )
    try:
        yield FakeGpu(cuda_runtime, fake_tensorrt)
    finally:
        for name in [n for n in sys.modules if _owned(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture
def fake_gpu() -> Iterator[FakeGpu]:
    """One fake GPU (compute capability 9.0) and fake TensorRT 10.13 for the test."""
    with installed_fakes() as handle:
        yield handle
