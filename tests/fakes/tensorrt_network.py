"""TEST DOUBLE: network definition and ONNX parser of the fake ``tensorrt`` module.

The parser loads ONNX with the onnx package; a corrupt file or an op without an ONNX schema
comes back as ``ParserError`` entries (code, description, node name and operator), as the
real ``OnnxParser.get_error`` reports them.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np


class DataType(enum.IntEnum):
    FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64, INT4 = range(10)


_NUMPY = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT8: np.int8,
    DataType.INT32: np.int32,
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
    DataType.INT64: np.int64,
}
_FROM_ONNX = {
    1: DataType.FLOAT,
    2: DataType.UINT8,
    3: DataType.INT8,
    6: DataType.INT32,
    7: DataType.INT64,
    9: DataType.BOOL,
    10: DataType.HALF,
    16: DataType.BF16,
}


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1  # EXPLICIT_BATCH (bit 0) was removed in TensorRT 11


class ErrorCode(enum.IntEnum):
    (
        SUCCESS,
        INTERNAL_ERROR,
        MEM_ALLOC_FAILED,
        MODEL_DESERIALIZE_FAILED,
        INVALID_VALUE,
        INVALID_GRAPH,
        INVALID_NODE,
        UNSUPPORTED_GRAPH,
        UNSUPPORTED_NODE,
    ) = range(9)


class ITensor:
    __slots__ = ("dims", "dtype", "name", "shape")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType, dims: list[str]):
        self.name, self.shape, self.dtype, self.dims = name, shape, dtype, dims


class INetworkDefinition:
    __slots__ = ("_flags", "inputs", "onnx_bytes", "outputs")

    def __init__(self, flags: int) -> None:
        self._flags = flags
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []
        self.onnx_bytes = b""

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, index: int) -> ITensor:
        return self.inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self.outputs[index]

    def get_flag(self, flag: NetworkDefinitionCreationFlag) -> bool:
        return bool(self._flags & (1 << int(flag)))


class ParserError:
    __slots__ = ("_code", "_desc", "_name", "_node", "_op")

    def __init__(self, code: ErrorCode, desc: str, node: int = -1, name: str = "", op: str = ""):
        self._code, self._desc, self._node, self._name, self._op = code, desc, node, name, op

    def code(self) -> ErrorCode:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op


class OnnxParser:
    __slots__ = ("_errors", "_logger", "_network")

    def __init__(self, network: INetworkDefinition, logger: Any) -> None:
        self._network, self._logger, self._errors = network, logger, []

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors = []

    def parse_from_file(self, model: str) -> bool:
        try:
            with open(model, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            self._errors.append(ParserError(ErrorCode.MODEL_DESERIALIZE_FAILED, str(exc)))
            return False
        return self.parse(data, model)

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        try:
            proto = onnx.load_from_string(bytes(model))
            if not proto.graph.node:
                raise ValueError("graph has no nodes")
        except Exception as exc:
            self._errors.append(
                ParserError(
                    ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model: {exc}"
                )
            )
            return False
        for index, node in enumerate(proto.graph.node):
            if not onnx.defs.has(node.op_type, node.domain or ""):
                self._errors.append(
                    ParserError(
                        ErrorCode.UNSUPPORTED_NODE,
                        f"No importer registered for op: {node.op_type}",
                        index,
                        node.name,
                        node.op_type,
                    )
                )
        if self._errors or not self._load_external_data(proto, path):
            return False
        initializers = {init.name for init in proto.graph.initializer}

        def tensor(value: Any) -> ITensor:
            ttype = value.type.tensor_type
            dims = [d.dim_param if not d.HasField("dim_value") else "" for d in ttype.shape.dim]
            shape = tuple(
                int(d.dim_value) if d.HasField("dim_value") else -1 for d in ttype.shape.dim
            )
            return ITensor(value.name, shape, _FROM_ONNX[ttype.elem_type], dims)

        net = self._network
        net.inputs = [tensor(v) for v in proto.graph.input if v.name not in initializers]
        net.outputs = [tensor(v) for v in proto.graph.output]
        net.onnx_bytes = proto.SerializeToString()
        return True

    def _load_external_data(self, proto: Any, path: str | None) -> bool:
        """Read external weights from beside the model file, where the real parser looks.

        Without a path (``parse(bytes)``) the real parser has no directory to look in either.
        """
        import os

        from onnx import TensorProto
        from onnx.external_data_helper import _get_all_tensors

        base = os.path.dirname(os.path.abspath(path)) if path else None
        for tensor in _get_all_tensors(proto):
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            location = info.get("location", "")
            target = os.path.join(base, location) if base else location
            need = int(info.get("offset", 0)) + int(info.get("length", 0))
            if base is None or not os.path.isfile(target) or os.path.getsize(target) < need:
                self._errors.append(
                    ParserError(
                        ErrorCode.INVALID_VALUE,
                        f"Failed to open file: {target} (external weights of initializer "
                        f"{tensor.name}; they must lie beside the model file)",
                    )
                )
                return False
            with open(target, "rb") as handle:  # follows links, like the real parser's ifstream
                handle.seek(int(info.get("offset", 0)))
                length = int(info["length"]) if "length" in info else -1
                tensor.raw_data = handle.read(length)
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
        return True
