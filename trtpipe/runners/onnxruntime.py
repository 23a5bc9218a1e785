"""ONNX Runtime runner: CUDA EP on a given GPU (with IO binding), CPU EP otherwise."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from trtpipe.devices import Device, require_visible
from trtpipe.engine import EngineDir
from trtpipe.errors import BackendUnavailableError, InputError, RunnerError
from trtpipe.runners.base import ManifestRunner
from trtpipe.runners.shared_session import SharedSession

log = logging.getLogger(__name__)

# Engine dirs already warned about running on another int8 kernel family (one warning each).
_WARNED_FAMILY: set[str] = set()


def warn_if_other_int8_family(engine: EngineDir) -> str | None:
    """Log once per engine when an int8 CPU engine runs on a CPU of another int8 kernel family.

    Its accuracy was measured with the build machine's int8 kernels (``cpu_int8_family`` in the
    manifest); other kernels round differently (trtpipe.cpu_features). Returns the warning.
    """
    from trtpipe.cpu_features import int8_kernel_family

    built_on = engine.manifest.cpu_int8_family
    here = int8_kernel_family()
    key = str(engine.path.resolve())
    if not built_on or built_on == here or key in _WARNED_FAMILY:
        return None
    _WARNED_FAMILY.add(key)
    message = (
        f"{engine.path} is an int8 engine built and calibrated on a CPU with {built_on} int8 "
        f"kernels; this CPU uses {here} kernels, which round differently: check its accuracy "
        f"here with trtpipe compare {engine.path}, or rebuild it on this machine"
    )
    log.warning(message)
    return message


def session_options(threads: int | None = None, spin: bool | None = None) -> Any:
    """Session options shared by the builder and the runner (graph already optimized offline).

    ``spin=False`` stops idle intra-op threads from busy-waiting between ops: in a server they
    would take the cores the front end needs; ``None`` keeps ONNX Runtime's default (spin).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if spin is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def providers_for(device: Device) -> list[Any]:
    """Execution providers for a device; a clear error when CUDA is asked for but absent."""
    import onnxruntime as ort

    if not device.is_gpu:
        return ["CPUExecutionProvider"]
    require_visible(device)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailableError(
            f"{device} requested but this onnxruntime has no CUDAExecutionProvider; "
            "install onnxruntime-gpu or use --devices cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"]


class OnnxRuntimeRunner(ManifestRunner):
    """Runs ``model.ort.onnx`` from an engine dir built for the onnxruntime backend."""

    backend = "onnxruntime"

    def __init__(self, engine: EngineDir, device: Device, threads: int | None = None):
        engine.expect_backend("onnxruntime")
        super().__init__(engine.manifest, device)
        self.engine = engine
        self.threads = threads
        self.spin: bool | None = None  # intra-op threads busy-wait (None: ONNX Runtime default)
        # Set by the pool's runner factory: the sessions this model's CPU workers share.
        self.shared: SharedSession | None = None
        self.session: Any = None

    @property
    def alone_threads(self) -> int | None:
        """Intra-op threads of a launch that runs while no other CPU worker runs."""
        return self.shared.alone_threads(self.threads) if self.shared else self.threads

    def load(self) -> None:
        if self.device.is_gpu:
            self.shared = None  # one session per GPU
        if self.shared is not None:
            self.session = self.shared.acquire(self._new_session, self.threads)
        else:
            self.session = self._new_session(self.threads)
        # Also on a GPU: ONNX Runtime runs the int8 contrib ops on the CPU.
        warn_if_other_int8_family(self.engine)
        self.loaded = True
        log.debug("loaded %s on %s", self.engine.path, self.device)

    def _new_session(self, threads: int | None) -> Any:
        import onnxruntime as ort

        options = session_options(threads, self.spin)
        # The engine file was optimized at build time; do not redo it on every load.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            session = ort.InferenceSession(
                str(self.engine.engine_path), options, providers=providers_for(self.device)
            )
        except BackendUnavailableError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RunnerError(f"cannot load {self.engine.engine_path}: {exc}") from exc
        if self.device.is_gpu and "CUDAExecutionProvider" not in session.get_providers():
            raise BackendUnavailableError(f"CUDA EP failed to initialise on {self.device}")
        return session

    def warm_every_session(self, feeds: dict[str, np.ndarray]) -> None:
        """Warm-up: run ``feeds`` on each session a launch may get (shared: narrow and wide)."""
        names = [o.name for o in self.outputs]
        for session in self.shared.sessions if self.shared else [self.session]:
            session.run(names, feeds)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        try:
            if self.device.is_gpu:
                return self._infer_io_binding(feeds, names)
            values = self._run_on_cpu(names, feeds)
        except InputError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "InvalidArgument":
                # ONNX Runtime's INVALID_ARGUMENT is about the data (an id outside a table),
                # not the device: the caller's error, and the device stays healthy.
                raise InputError(f"{self.describe()} rejected the inputs: {exc}") from exc
            raise RunnerError(f"{self.describe()} failed: {exc}") from exc
        return dict(zip(names, values, strict=True))

    def _run_on_cpu(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[Any]:
        if self.shared is None:
            return list(self.session.run(names, feeds))
        with self.shared.launch() as session:
            return list(session.run(names, feeds))

    def _infer_io_binding(
        self, feeds: dict[str, np.ndarray], names: list[str]
    ) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in names:
            binding.bind_output(name, "cuda", self.device.index)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))

    def close(self) -> None:
        if self.session is not None and self.shared is not None:
            self.shared.release()
        self.session = None
        super().close()
