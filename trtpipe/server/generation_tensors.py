"""The v2 infer tensors of a generation model, as Triton's TensorRT-LLM backend names them.

What a generation model advertises in its metadata and config (``ServedGeneration``) and what
``trtpipe.server.generation_v2`` decodes: kept apart so that both read one list.
"""

from __future__ import annotations

from typing import Any

# name -> (v2 datatype advertised, kind accepted, optional). Kinds: numpy dtype kinds.
INPUTS: dict[str, tuple[str, str, bool]] = {
    "text_input": ("BYTES", "O", False),
    "max_tokens": ("INT32", "iu", False),
    "temperature": ("FP32", "fiu", True),
    "top_k": ("INT32", "iu", True),
    "top_p": ("FP32", "fiu", True),
    "random_seed": ("UINT64", "iu", True),
    "seed": ("UINT64", "iu", True),
    "end_id": ("INT32", "iu", True),
    "stop_words": ("BYTES", "O", True),
    "beam_width": ("INT32", "iu", True),
    "ignore_eos": ("BOOL", "b", True),
    "exclude_input_in_output": ("BOOL", "b", True),
    "stream": ("BOOL", "b", True),
}
OUTPUT = "text_output"


def tensor_documents() -> dict[str, list[dict[str, Any]]]:
    """Metadata/config entries: the inputs above and ``text_output``, without the batch dim."""
    inputs = [
        {
            "name": name,
            "datatype": datatype,
            "shape": [-1] if name == "stop_words" else [1],
            "optional": optional,
        }
        for name, (datatype, _, optional) in INPUTS.items()
    ]
    return {"inputs": inputs, "outputs": [{"name": OUTPUT, "datatype": "BYTES", "shape": [1]}]}
