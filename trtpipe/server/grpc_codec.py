"""KServe v2 gRPC messages <-> the server's request and reply types.

``decode_request`` turns a ``ModelInferRequest`` (raw or typed contents, or shared memory
regions) into an :class:`InferRequest`, checking every stated size; ``encode_response`` builds
the ``ModelInferResponse``, always with ``raw_output_contents`` like Triton. Both the tensor
service (``trtpipe.server.grpc``) and generation (``trtpipe.server.generation_v2``) use them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from trtpipe.server.protocol import (
    InferRequest,
    InputTensor,
    ProtocolError,
    RequestedOutput,
    check_shape,
    element_count,
    numpy_dtype,
    raw_data,
    shared_memory_off,
    shared_memory_ref,
    tensor_from_raw,
    v2_datatype,
)

# Typed InferTensorContents field for each datatype (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(param: Any) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def decode_request(request: Any, shared_memory: Any = None) -> InferRequest:
    """ModelInferRequest -> InferRequest, checking every stated size.

    ``shared_memory`` (None: the extension is off) resolves tensors that name a region; the
    raw_input_contents then belong, in order, to the inputs that do not.
    """
    if not request.inputs:
        raise ProtocolError("infer request has no inputs")
    raw = request.raw_input_contents
    in_memory = [t for t in request.inputs if "shared_memory_region" not in t.parameters]
    if raw and len(raw) != len(in_memory):
        raise ProtocolError(
            f"raw_input_contents has {len(raw)} entries for {len(in_memory)} inputs; "
            "send raw contents for every input (not in shared memory) or for none"
        )
    inputs: list[InputTensor] = []
    raw_index = 0
    for index, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if not name:
            raise ProtocolError(f"inputs[{index}] needs a name")
        dtype = numpy_dtype(datatype, name)
        shape = check_shape([int(d) for d in tensor.shape], name)
        if "shared_memory_region" in tensor.parameters:
            if shared_memory is None:
                raise shared_memory_off(name)
            ref = grpc_shared_memory_ref(tensor.parameters, name)
            data = tensor_from_raw(name, datatype, shape, shared_memory.read(ref, name))
        elif raw:
            data = tensor_from_raw(name, datatype, shape, raw[raw_index])
            raw_index += 1
        else:
            field = CONTENTS_FIELD.get(datatype)
            if field is None:
                raise ProtocolError(f"input {name!r}: {datatype} must be sent as raw contents")
            values = getattr(tensor.contents, field)
            if len(values) != element_count(shape):
                raise ProtocolError(
                    f"input {name!r}: shape {shape} needs {element_count(shape)} elements, "
                    f"contents has {len(values)}"
                )
            if datatype == "BYTES":
                data = np.empty(len(values), dtype=object)
                data[:] = list(values)
                data = data.reshape(shape)
            else:
                try:
                    data = np.array(values, dtype=dtype).reshape(shape)
                except OverflowError as exc:
                    raise ProtocolError(f"input {name!r}: values do not fit {datatype}") from exc
        inputs.append(InputTensor(name, datatype, shape, data))
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise ProtocolError(f"an input is given twice: {names}")
    outputs = [
        RequestedOutput(o.name, True, requested_region(o, shared_memory)) for o in request.outputs
    ] or None
    parameters = {k: parameter_value(v) for k, v in request.parameters.items()}
    return InferRequest(inputs, outputs, request.id, parameters)


def grpc_shared_memory_ref(parameters: Any, name: str) -> Any:
    return shared_memory_ref({k: parameter_value(v) for k, v in parameters.items()}, name)


def requested_region(output: Any, shared_memory: Any) -> Any:
    """The shared memory region a requested output names (None: sent in the response)."""
    if "shared_memory_region" not in output.parameters:
        return None
    if shared_memory is None:
        raise shared_memory_off(output.name)
    return grpc_shared_memory_ref(output.parameters, output.name)


def encode_response(
    model_name: str,
    version: str,
    request_id: str,
    outputs: Any,
    placed: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """``placed``: outputs written to shared memory (name -> parameters); their raw contents
    entry is empty, which keeps raw_output_contents aligned with outputs."""
    response = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=version, id=request_id
    )
    for name, array, _ in outputs:
        entry = response.outputs.add()
        entry.name = name
        entry.datatype = v2_datatype(array.dtype)
        entry.shape.extend(int(d) for d in array.shape)
        if placed and name in placed:
            for key, value in placed[name].items():
                if isinstance(value, str):
                    entry.parameters[key].string_param = value
                else:
                    entry.parameters[key].int64_param = int(value)
            response.raw_output_contents.append(b"")
        else:
            response.raw_output_contents.append(raw_data(array))
    return response
