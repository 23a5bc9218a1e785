"""Cutting a decoder graph into stages that each hold only their own layers' cache.

A hand-made two-block "decoder" with the two reads an export makes in its shared preparation
(the shape of layer 0's past, the shape of the embedding output): the later stage must get them
from its own past and its hidden state, lose the embedding table and layer 0's past, and give
the whole graph's outputs; a block that reads another layer's cache values is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from trtpipe.errors import InputError


def toy_decoder(leak: bool = False) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def past(i: int) -> Any:
        shape = ["batch", 1, "past", 4]
        return helper.make_tensor_value_info(f"past_key_values.{i}.key", TensorProto.FLOAT, shape)

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        past(0),
        past(1),
    ]
    weights = [
        numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "w1"),
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["table", "input_ids"], ["emb"], name="/model/embed/Gather"),
        node("Shape", ["past_key_values.0.key"], ["past_shape"], name="/model/Shape"),
        node("Shape", ["emb"], ["emb_shape"], name="/model/Shape_1"),
        node("Add", ["emb", "w0"], ["h0"], name="/model/layers.0/Add"),
        node("Identity", ["past_key_values.0.key"], ["present.0.key"], name="/model/layers.0/Id"),
        node("Add", ["h0", "w1"], ["a1"], name="/model/layers.1/Add"),
        node("Reshape", ["a1", "emb_shape"], ["h1"], name="/model/layers.1/Reshape"),
        node("Identity", ["past_key_values.1.key"], ["present.1.key"], name="/model/layers.1/Id"),
        node("Identity", ["past_shape"], ["shape_out"], name="/model/layers.1/Id_2"),
        node("Identity", ["h1"], ["logits"], name="/model/norm/Identity"),
    ]
    outputs = ["logits", "present.0.key", "present.1.key", "shape_out"]
    if leak:  # block 1 reads block 0's cache values, not just its shape
        nodes.append(
            node("Identity", ["past_key_values.0.key"], ["leak"], name="/model/layers.1/Leak")
        )
        outputs.append("leak")
    graph = helper.make_graph(
        nodes,
        "toy",
        inputs,
        [
            helper.make_tensor_value_info(
                n, TensorProto.INT64 if n == "shape_out" else TensorProto.FLOAT, None
            )
            for n in outputs
        ],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def run(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values, strict=True))


def test_later_stage_reads_only_its_own_cache_and_hidden_state() -> None:
    from trtpipe.build.decoder_stages import decoder_stage_models, plan_decoder_stages

    model = toy_decoder()
    plans = plan_decoder_stages(model, 2)
    first, second = list(decoder_stage_models(model, plans))
    assert plans[0].outputs == ["h0", "present.0.key"]
    assert sorted(plans[1].inputs) == ["h0", "past_key_values.1.key"]
    assert plans[1].outputs == ["logits", "present.1.key", "shape_out"]
    assert {w.name for w in second.graph.initializer} == {"w1"}  # no embedding table
    assert plans[1].weight_bytes == 16 and plans[0].weight_bytes == 40 * 4 + 16
    rng = np.random.default_rng(1)
    feeds = {
        "input_ids": rng.integers(0, 10, (2, 3)),
        "past_key_values.0.key": rng.standard_normal((2, 1, 5, 4)).astype(np.float32),
        "past_key_values.1.key": rng.standard_normal((2, 1, 5, 4)).astype(np.float32),
    }
    whole = run(model, feeds)
    staged = run(first, feeds)
    staged.update(run(second, {**feeds, **staged}))
    for name in ("logits", "present.0.key", "present.1.key", "shape_out"):
        np.testing.assert_array_equal(staged[name], whole[name])
    assert list(staged["shape_out"]) == [2, 1, 5, 4]


def test_a_block_reading_another_layers_cache_is_refused() -> None:
    from trtpipe.build.decoder_stages import decoder_stage_models, plan_decoder_stages

    model = toy_decoder(leak=True)
    plans = plan_decoder_stages(model, 2)
    with pytest.raises(InputError, match=r"stage 1 .* still reads past_key_values\.0\.key"):
        list(decoder_stage_models(model, plans))
