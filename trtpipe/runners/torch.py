"""PyTorch runner: the source Hugging Face model, eager, as the reference and the baseline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import TensorSpec
from trtpipe.errors import InputError, RunnerError
from trtpipe.runners.base import Runner

log = logging.getLogger(__name__)


class TorchRunner(Runner):
    """Loads the model the way optimum exported it; outputs carry the engine's names.

    ``inputs``/``outputs`` are taken from the engine's manifest, so compare and bench can feed
    both runners the same dict.
    """

    backend = "torch"

    def __init__(
        self,
        model: str,
        task: str,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        library: str = "transformers",
        device: Device | None = None,
        dtype: str = "float32",
        threads: int | None = None,
    ):
        super().__init__(device or Device("cpu"))
        self.model_path = model
        self.task = task
        self.library = library
        self.dtype = dtype
        self.threads = threads
        self._inputs = inputs
        self._outputs = outputs
        self.model: Any = None
        self.torch: Any = None

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.device.index}" if self.device.is_gpu else "cpu"

    def load(self) -> None:
        import torch

        self.torch = torch
        if self.threads:
            torch.set_num_threads(self.threads)
        if not self.model_path:
            raise InputError(
                "no reference model: the manifest has no source model; pass --reference"
            )
        if not Path(self.model_path).exists():
            from trtpipe.export import resolve_model

            self.model_path = resolve_model(self.model_path)
        torch_dtype = getattr(torch, self.dtype)
        try:
            if self.library == "sentence_transformers":
                from sentence_transformers import SentenceTransformer

                self.model = SentenceTransformer(
                    str(self.model_path), device=self.torch_device, local_files_only=True
                )
                self.model.to(torch_dtype)
            else:
                from optimum.exporters.tasks import TasksManager

                task = self.task.replace("-with-past", "")
                self.model = TasksManager.get_model_from_task(
                    task,
                    str(self.model_path),
                    framework="pt",
                    library_name="transformers",
                    torch_dtype=torch_dtype,
                    device=self.torch_device,
                )
        except OSError as exc:
            raise InputError(f"cannot load reference model {self.model_path}: {exc}") from exc
        self.model.eval()
        self.loaded = True

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        tensors = {k: torch.from_numpy(v).to(self.torch_device) for k, v in feeds.items()}
        try:
            with torch.inference_mode():
                result = (
                    self.model(tensors)
                    if self.library == "sentence_transformers"
                    else (self.model(**tensors))
                )
        except RuntimeError as exc:
            raise RunnerError(f"PyTorch model failed: {exc}") from exc
        outputs: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            value = result[spec.name] if spec.name in result else getattr(result, spec.name, None)
            if value is None:
                raise RunnerError(f"PyTorch model has no output {spec.name!r}")
            outputs[spec.name] = value.detach().float().cpu().numpy()
        return outputs

    def close(self) -> None:
        self.model = None
        super().close()


def reference_runner(
    manifest: Any,
    reference: str | None = None,
    device: Device | None = None,
    dtype: str = "float32",
    threads: int | None = None,
) -> TorchRunner:
    """The PyTorch model an engine was built from (or ``reference``), with the engine's I/O."""
    return TorchRunner(
        model=reference or manifest.source_model,
        task=manifest.task,
        inputs=manifest.inputs,
        outputs=manifest.outputs,
        library=manifest.library,
        device=device,
        dtype=dtype,
        threads=threads,
    )
