"""TEST DOUBLE of the ``tensorrt`` Python module (the 10.12+/11.x subset trtpipe uses).

Not TensorRT: no GPU code runs. The builder "parses" ONNX with the onnx package (parser errors
come back through ``get_error``), the serialized plan embeds a header (version, compute
capability, profile, I/O) plus the ONNX bytes, and the engine computes with ONNX Runtime on the
CPU when the fake CUDA stream is synchronized, reading and writing fake device memory.

Strict like real TensorRT 10/11 (or stricter, where the project forbids something):
APIs removed in 10/11 do not exist (``BuilderFlag.FP16/INT8``, calibrators, ``build_engine``,
``max_workspace_size``, ``EXPLICIT_BATCH``, ``execute_async_v2``, bindings); classes use
``__slots__`` so setting a removed attribute fails; networks must be created STRONGLY_TYPED;
``set_input_shape`` outside the profile returns False; ``execute_async_v3`` returns False for
unset input shapes, missing or too small tensor addresses, or the default stream; a launch whose
inputs were not fully copied to the device (e.g. a dtype of the wrong width) faults at sync;
plans from another version or compute capability do not deserialize.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from typing import Any

from tests.fakes import cuda_runtime
from tests.fakes.tensorrt_network import (  # noqa: F401 - re-exported as tensorrt.*
    _NUMPY,
    DataType,
    ErrorCode,
    INetworkDefinition,
    ITensor,
    NetworkDefinitionCreationFlag,
    OnnxParser,
    ParserError,
)

IS_TEST_DOUBLE = True
__version__ = "10.13.3.9"
PLAN_MAGIC = b"FAKETRTPLAN\0"
CACHE_MAGIC = b"FAKETRTCACHE\0"
STATS: dict[str, int] = {}
# What each build_serialized_network call received: network (typed graph, I/O) and config.
BUILDS: list[dict[str, Any]] = []


def reset(version: str = "10.13.3.9") -> None:
    global __version__
    __version__ = version
    STATS.clear()
    BUILDS.clear()
    STATS.update(builds=0, launches=0, timing_cache_hits=0, timing_cache_misses=0)


reset()


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: Any, msg: str) -> None:
        raise NotImplementedError


class Logger(ILogger):
    def __init__(self, min_severity: Any = ILogger.WARNING) -> None:
        self.min_severity = min_severity
        self.messages: list[tuple[Any, str]] = []

    def log(self, severity: Any, msg: str) -> None:
        self.messages.append((severity, msg))


def nptype(trt_type: DataType) -> Any:
    if trt_type not in _NUMPY:
        raise TypeError(
            f"Could not resolve TensorRT datatype {trt_type!r} to an equivalent numpy type"
        )
    return _NUMPY[trt_type]


class TensorIOMode(enum.IntEnum):
    NONE, INPUT, OUTPUT = range(3)


class MemoryPoolType(enum.IntEnum):
    WORKSPACE, DLA_MANAGED_SRAM, DLA_LOCAL_DRAM, DLA_GLOBAL_DRAM, TACTIC_DRAM = range(5)


class BuilderFlag(enum.IntEnum):  # no FP16/INT8/BF16/FP8: precision lives in the graph
    DEBUG, GPU_FALLBACK, REFIT, VERSION_COMPATIBLE, STRIP_PLAN = (2, 3, 4, 14, 18)


class IHostMemory(bytes):
    """Serialized data; supports the buffer protocol like the real one."""

    @property
    def nbytes(self) -> int:
        return len(self)


class IOptimizationProfile:
    __slots__ = ("_shapes", "_valid")

    def __init__(self) -> None:
        self._shapes: dict[str, list[tuple[int, ...]]] = {}
        self._valid = True

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        """Raises RuntimeError for an invalid range, as the real binding does."""
        shapes = [tuple(int(d) for d in s) for s in (min, opt, max)]
        ranks = {len(s) for s in shapes}
        ordered = all(a <= b <= c for a, b, c in zip(*shapes, strict=False))
        if len(ranks) != 1 or not ordered or any(d < 0 for s in shapes for d in s):
            self._valid = False
            raise RuntimeError(
                f"Error in set_shape: {input}: min {shapes[0]}, opt {shapes[1]}, max {shapes[2]}"
            )
        self._shapes[input] = shapes

    def get_shape(self, input: str) -> list[tuple[int, ...]]:
        return self._shapes[input]

    def __bool__(self) -> bool:
        return self._valid


class ITimingCache:
    __slots__ = ("capability", "entries")

    def __init__(self, entries: list[str], capability: list[int]) -> None:
        self.entries, self.capability = entries, capability

    def serialize(self) -> IHostMemory:
        body = json.dumps({"entries": self.entries, "capability": self.capability})
        return IHostMemory(CACHE_MAGIC + body.encode())


def _capability() -> list[int]:
    return list(cuda_runtime.STATE.capability)


class IBuilderConfig:
    __slots__ = ("_cache", "_flags", "_level", "_logger", "_pools", "_profiles")

    def __init__(self, logger: ILogger) -> None:
        self._logger, self._pools, self._profiles = logger, {}, []
        self._level, self._cache, self._flags = 3, None, 0

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        if int(pool_size) <= 0:
            raise ValueError("memory pool limit must be positive")
        self._pools[MemoryPoolType(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self._pools.get(MemoryPoolType(pool), 1 << 40)

    @property
    def builder_optimization_level(self) -> int:
        return self._level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level: int) -> None:
        if not 0 <= int(level) <= 5:
            raise ValueError(f"builder_optimization_level must be 0..5, got {level}")
        self._level = int(level)

    def set_flag(self, flag: BuilderFlag) -> None:
        self._flags |= 1 << int(BuilderFlag(flag))

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile:
            self._logger.log(ILogger.ERROR, "IOptimizationProfile is invalid")
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    num_optimization_profiles = property(lambda self: len(self._profiles))

    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache([], _capability())
        if not data.startswith(CACHE_MAGIC):
            self._logger.log(ILogger.ERROR, "timing cache deserialization failed")
            return None
        body = json.loads(data[len(CACHE_MAGIC) :])
        return ITimingCache(list(body["entries"]), list(body["capability"]))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache.capability != _capability() and not ignore_mismatch:
            self._logger.log(ILogger.ERROR, "timing cache was created on a different device")
            return False
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache


class Builder:
    __slots__ = ("_logger",)

    def __init__(self, logger: ILogger) -> None:
        if cuda_runtime.STATE.device_count == 0:
            raise RuntimeError("CUDA initialization failure with error: 100")
        self._logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        strongly = 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if int(flags) & ~strongly:
            raise ValueError(f"unknown network creation flags {flags:#x} (EXPLICIT_BATCH is gone)")
        if not int(flags) & strongly:
            raise ValueError("fake TensorRT: trtpipe networks must be created STRONGLY_TYPED")
        return INetworkDefinition(int(flags))

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self._logger)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(
        self, network: INetworkDefinition, config: IBuilderConfig
    ) -> IHostMemory | None:
        STATS["builds"] += 1
        BUILDS.append(
            {
                "onnx_bytes": network.onnx_bytes,
                "inputs": {t.name: DataType(t.dtype).name for t in network.inputs},
                "outputs": {t.name: DataType(t.dtype).name for t in network.outputs},
                "workspace": config._pools.get(MemoryPoolType.WORKSPACE),
                "optimization_level": config._level,
                "flags": config._flags,
                "profile": {
                    k: [list(s) for s in v] for p in config._profiles for k, v in p._shapes.items()
                },
            }
        )
        if not network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED) or not network.inputs:
            self._logger.log(ILogger.ERROR, "network is empty or not strongly typed")
            return None
        if len(config._profiles) != 1:
            self._logger.log(
                ILogger.ERROR, f"expected 1 optimization profile, got {len(config._profiles)}"
            )
            return None
        profile = config._profiles[0]._shapes
        for tensor in network.inputs:
            shapes = profile.get(tensor.name)
            fits = shapes is not None and all(
                len(s) == len(tensor.shape)
                and all(d == -1 or d == v for d, v in zip(tensor.shape, s, strict=True))
                for s in shapes
            )
            if not fits:
                self._logger.log(ILogger.ERROR, f"{tensor.name}: no or incompatible profile shape")
                return None
        header = {
            "version": __version__,
            "capability": _capability(),
            "profile": {k: [list(s) for s in v] for k, v in profile.items()},
            "io": [
                {
                    "name": t.name,
                    "mode": int(mode),
                    "dtype": int(t.dtype),
                    "shape": list(t.shape),
                    "dims": t.dims,
                }
                for mode, tensors in (
                    (TensorIOMode.INPUT, network.inputs),
                    (TensorIOMode.OUTPUT, network.outputs),
                )
                for t in tensors
            ],
        }
        key = hashlib.sha256(network.onnx_bytes + json.dumps(header).encode()).hexdigest()[:16]
        if config._cache is not None:
            hit = key in config._cache.entries
            STATS["timing_cache_hits" if hit else "timing_cache_misses"] += 1
            if not hit:
                config._cache.entries.append(key)
        return IHostMemory(plan_bytes(header, network.onnx_bytes))


def plan_bytes(header: dict[str, Any], onnx_bytes: bytes) -> bytes:
    """A fake plan: magic, header length, JSON header (version, capability, profile, I/O), graph."""
    blob = json.dumps(header).encode()
    return PLAN_MAGIC + struct.pack("<Q", len(blob)) + blob + onnx_bytes


class Runtime:
    __slots__ = ("_logger",)

    def __init__(self, logger: ILogger) -> None:
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine: Any) -> Any:
        from tests.fakes.tensorrt_engine import ICudaEngine

        data = bytes(serialized_engine)
        if not data.startswith(PLAN_MAGIC):
            self._logger.log(ILogger.ERROR, "Serialization assertion failed: magic tag mismatch")
            return None
        start = len(PLAN_MAGIC) + 8
        (length,) = struct.unpack("<Q", data[len(PLAN_MAGIC) : start])
        header = json.loads(data[start : start + length])
        if header["version"] != __version__:
            self._logger.log(
                ILogger.ERROR,
                "The engine plan file is not compatible with this "
                f"version of TensorRT, expecting {__version__} got {header['version']}",
            )
            return None
        if header["capability"] != _capability():
            self._logger.log(
                ILogger.ERROR,
                "The engine plan file is generated on an "
                f"incompatible device, expecting {_capability()} got {header['capability']}",
            )
            return None
        return ICudaEngine(header, data[start + length :], self._logger)
