"""A runner that computes nothing: the engine's signature at zero cost.

``trtpipe serve --null-runner`` puts it behind the real front ends, batcher and pool, so a load
generator measures what those layers alone sustain: the ceiling a fast GPU deployment hits.
It is a measuring tool, never a backend: its outputs are zeros of the right shapes and dtypes.
"""

from __future__ import annotations

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import Manifest
from trtpipe.runners.base import ManifestRunner


class NullRunner(ManifestRunner):
    backend = "null"

    def __init__(self, manifest: Manifest, device: Device):
        super().__init__(manifest, device)
        self._zeros: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    def load(self) -> None:
        self.loaded = True

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sizes: dict[str, int] = {}
        for spec in self.inputs:
            for dim, size in zip(spec.dims, feeds[spec.name].shape, strict=False):
                sizes.setdefault(dim, int(size))
        outputs = {}
        for spec in self.outputs:
            shape = tuple(
                fixed if fixed >= 0 else sizes.get(dim, 1)
                for fixed, dim in zip(spec.shape, spec.dims or [""] * len(spec.shape), strict=True)
            )
            key = (spec.name, shape)
            if key not in self._zeros:
                self._zeros[key] = np.zeros(shape, dtype=spec.dtype)
            outputs[spec.name] = self._zeros[key]
        return outputs
