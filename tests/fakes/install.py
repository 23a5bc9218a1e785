"""Install the TEST DOUBLES as ``tensorrt`` and ``cuda.bindings.runtime``/``driver`` for a test.

``fake_gpu`` puts the fakes into ``sys.modules`` (with ``cuda`` and ``cuda.bindings`` package
stand-ins), resets their state, yields a handle for assertions, and restores whatever modules
were there before (the real cuda-python stays installed for other tests).

Test modules wrap :func:`installed_fakes` in a local fixture (importing ``fake_gpu`` into a
module would shadow it in every test signature), or use ``fake_gpu`` as a plugin fixture.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fakes import cuda_driver, cuda_runtime
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


def _captured_fakes(before: set[str], fakes: list[Any]) -> list[str]:
    """Modules imported while the fakes were installed that still hold one of them."""
    found = []
    for name, module in list(sys.modules.items()):
        if name in before or _owned(name) or name.startswith("tests.fakes"):
            continue
        values = getattr(module, "__dict__", {}).values()
        if any(any(value is fake for fake in fakes) for value in values):
            found.append(name)
    return found


@contextlib.contextmanager
def installed_fakes(
    device_count: int = 1,
    capability: tuple[int, int] = (9, 0),
    version: str = "10.13.3.9",
    preimport: tuple[str, ...] = (),
) -> Iterator[FakeGpu]:
    """Install the fakes; ``preimport`` names modules to import first, with the real modules.

    Libraries that probe for ``tensorrt`` at import time (ModelOpt's ``modelopt.onnx.trt_utils``
    does) must be imported before the fakes go in, or they would keep the fake afterwards;
    teardown fails loudly if that happened.
    """
    for name in preimport:
        importlib.import_module(name)
    before = set(sys.modules)
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
    bindings.driver = cuda_driver  # type: ignore[attr-defined]
    cuda_pkg.bindings = bindings  # type: ignore[attr-defined]
    sys.modules.update(
        {
            "cuda": cuda_pkg,
            "cuda.bindings": bindings,
            "cuda.bindings.runtime": cuda_runtime,
            "cuda.bindings.driver": cuda_driver,
            "tensorrt": fake_tensorrt,
        }
    )
    try:
        yield FakeGpu(cuda_runtime, fake_tensorrt)
    finally:
        for name in [n for n in sys.modules if _owned(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
    fakes = [fake_tensorrt, cuda_runtime, cuda_driver, cuda_pkg, bindings]
    captured = _captured_fakes(before, fakes)
    if captured:
        raise RuntimeError(
            f"{captured} imported the fake tensorrt/cuda and would keep it; "
            "pass them to installed_fakes(preimport=...)"
        )


@pytest.fixture
def fake_gpu() -> Iterator[FakeGpu]:
    """One fake GPU (compute capability 9.0) and fake TensorRT 10.13 for the test."""
    with installed_fakes() as handle:
        yield handle
