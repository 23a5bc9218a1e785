"""The Runner interface shared by every backend (after Polygraphy's runners).

A runner is loaded on one device, takes named numpy feeds and returns named numpy outputs.
Compare, bench, the device pool and the server work on any runner.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import Manifest, ShapeRange, TensorSpec
from trtpipe.errors import InputError, TrtpipeError


class Runner(abc.ABC):
    """Load on one device; ``infer(feeds) -> outputs``; context-managed."""

    backend: str = "abstract"

    def __init__(self, device: Device):
        self.device = device
        self.loaded = False

    # -- interface -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def inputs(self) -> list[TensorSpec]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def load(self) -> None:
        """Allocate everything needed to run (sessions, contexts, buffers)."""

    @abc.abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; feeds are already validated."""

    def close(self) -> None:
        """Free device resources; safe to call twice."""
        self.loaded = False

    # -- shared behaviour --------------------------------------------------------------------
    @property
    def profile(self) -> dict[str, ShapeRange]:
        """Accepted shape ranges per input (empty when unconstrained)."""
        return {}

    @property
    def max_batch_size(self) -> int:
        return min((r.max[0] for r in self.profile.values() if r.max), default=1 << 30)

    def describe(self) -> str:
        return f"{self.backend}@{self.device}"

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.loaded:
            raise TrtpipeError(f"{self.describe()} is not loaded; call load() first")
        checked = validate_feeds(feeds, self.inputs, self.profile)
        return self._infer(checked)

    def __enter__(self) -> Runner:
        if not self.loaded:
            self.load()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def validate_feeds(
    feeds: dict[str, np.ndarray],
    inputs: list[TensorSpec],
    profile: dict[str, ShapeRange],
) -> dict[str, np.ndarray]:
    """Check names, dtypes and shapes against the specs/profile; cast safe integer widths.

    Errors name the input and the allowed range, so a client can fix the request.
    """
    expected = {spec.name: spec for spec in inputs}
    unknown = sorted(set(feeds) - set(expected))
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; the engine takes {sorted(expected)}")
    missing = sorted(set(expected) - set(feeds))
    if missing:
        raise InputError(f"missing input(s) {missing}")
    checked: dict[str, np.ndarray] = {}
    batch: int | None = None
    for name, spec in expected.items():
        array = np.asarray(feeds[name])
        want = np.dtype(spec.dtype)
        if array.dtype != want:
            same_kind = array.dtype.kind in "iu" and want.kind in "iu"
            if not same_kind:
                raise InputError(f"input {name!r} has dtype {array.dtype}, expected {want}")
            array = array.astype(want)
        if array.ndim != len(spec.shape):
            raise InputError(
                f"input {name!r} has rank {array.ndim} (shape {list(array.shape)}), "
                f"expected rank {len(spec.shape)} (shape {spec.shape})"
            )
        for axis, (got, fixed) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if fixed >= 0 and got != fixed:
                raise InputError(f"input {name!r} dim {axis} is {got}, the engine requires {fixed}")
        shape_range = profile.get(name)
        if shape_range is not None and not shape_range.contains(tuple(array.shape)):
            raise InputError(
                f"input {name!r} shape {list(array.shape)} is outside the engine's profile "
                f"(min {shape_range.min}, max {shape_range.max})"
            )
        if array.ndim and spec.dims and spec.dims[0] == "batch":
            if batch is not None and array.shape[0] != batch:
                raise InputError(f"inputs disagree on batch size ({batch} vs {array.shape[0]})")
            batch = array.shape[0]
        checked[name] = np.ascontiguousarray(array)
    return checked


class ManifestRunner(Runner):
    """A runner whose specs and profile come from an engine manifest."""

    def __init__(self, manifest: Manifest, device: Device):
        super().__init__(device)
        self.manifest = manifest

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.manifest.outputs

    @property
    def profile(self) -> dict[str, ShapeRange]:
        return self.manifest.profile
