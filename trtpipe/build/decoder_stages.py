"""Pipeline stages for KV-cache decoders: each stage holds only its own layers' cache.

The block ranges come from ``trtpipe.build.stages`` (weight bytes or ``--stage-layers``); what
differs for a decoder is the I/O. ``present.i.*`` leaves the stage that owns block ``i`` (not
the last one), and the mask/position preparation every block needs is recomputed in each stage
from ``attention_mask`` / ``position_ids``, which every stage takes as inputs (a few int64 per
token) rather than receiving the prepared 4-D mask (batch x sequence x total floats per step).

An exported decoder reads two things in that preparation that a later stage must not need: the
shape of layer 0's past (the past length) and the shape of the embedding output (batch and
sequence). After extraction each later stage's ``Shape`` nodes are pointed at a tensor the stage
has anyway: its own first layer's past (same batch and past length) and the incoming hidden
state (same batch, sequence and width), when shape inference shows the dims are the same
symbols. The nodes left unused (the embedding lookup and its table, other layers' past inputs)
are then pruned, so a stage's weights are its blocks plus what it really reads (the last stage's
LM head; GPT-2's tied embedding appears there as the head's own transposed copy).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trtpipe.build.stages import (
    StagePlan,
    extract_stage,
    fill_stage_inputs,
    initializer_bytes,
    node_positions,
    plan_stages,
)
from trtpipe.errors import InputError
from trtpipe.generation.kv_cache import PAST_RE

log = logging.getLogger(__name__)


def plan_decoder_stages(
    model: Any, stages: int, stage_layers: str | None = None
) -> list[StagePlan]:
    """Block ranges as for any model; I/O with each layer's cache on its own stage."""
    plans = plan_stages(model, stages, stage_layers)
    for plan in plans:
        plan.inputs, plan.outputs = [], []
    _fill_decoder_io(model.graph, plans)
    return plans


def _fill_decoder_io(graph: Any, plans: list[StagePlan]) -> None:
    """Outputs: tensors later stages read, plus the graph outputs the stage's nodes make
    (its ``present.*``; ``logits`` on the last). Inputs: what walking back from them reaches
    (graph inputs and earlier stages' outputs), before the per-stage narrowing."""
    positions = node_positions(graph)
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            producer[name] = i

    def stage_of(pos: int) -> int:
        if pos < 0:
            return -1
        return next((p.index for p in plans if pos <= p.last_layer), plans[-1].index)

    node_stage = [stage_of(p) for p in positions]
    stream = token_stream(graph)
    for i, node in enumerate(graph.node):
        for name in node.input:
            src = producer.get(name)
            if src is None or node_stage[src] < 0 or node_stage[src] >= node_stage[i]:
                continue
            if name not in stream:
                continue  # mask/position work (rotary cos/sin...): the later stage redoes it
            made_by = plans[node_stage[src]]
            if name not in made_by.outputs:
                made_by.outputs.append(name)
    for value in graph.output:
        src = producer.get(value.name)
        owner = max(node_stage[src], 0) if src is not None else plans[-1].index
        plans[owner].outputs.append(value.name)
    fill_stage_inputs(graph, plans, producer)


def token_stream(graph: Any) -> set[str]:
    """Tensors whose values depend on the tokens or a layer's cache (not only on their shapes).

    Only these must travel between stages: everything else is a function of ``attention_mask``,
    ``position_ids`` and shapes, which every stage has.
    """
    stream = {
        v.name for v in graph.input if v.name == "input_ids" or PAST_RE.match(v.name) is not None
    }
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type in ("Shape", "Size"):
            continue
        if any(name in stream for name in node.input):
            stream.update(n for n in node.output if n)
    return stream


def symbolic_shapes(model: Any) -> dict[str, tuple[Any, ...] | None]:
    """Every tensor's dims with symbols (ONNX Runtime's symbolic shape inference, which follows
    computed reshapes that ONNX's own inference gives up on); ONNX's inference as a fallback."""
    import onnx.shape_inference

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True).graph
    except Exception as exc:  # the tool raises assorted types on unusual graphs
        log.debug("symbolic shape inference failed (%s); using ONNX's", exc)
        inferred = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: _dims(v) for v in [*inferred.value_info, *inferred.input, *inferred.output]}


def decoder_stage_models(
    model: Any, plans: list[StagePlan], weights_dir: Path | None = None
) -> Iterator[Any]:
    """One ONNX model per stage, narrowed to its own cache and weights, made one at a time.

    As ``trtpipe.build.stages.stage_models``: external weights are read per stage from
    ``weights_dir`` after the cut, so only one stage's weights are in memory at a time.
    """
    import onnx.shape_inference
    import onnx.utils
    from onnx.external_data_helper import load_external_data_for_model

    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    shapes = symbolic_shapes(model)
    graph_inputs = [v.name for v in model.graph.input]
    dim_names: dict[str, list[str]] = {}
    for value in model.graph.input:
        dim_names[value.name] = [d.dim_param for d in value.type.tensor_type.shape.dim]
    first = next(iter(dim_names.values()), [])
    dim_names["__hidden__"] = [n for n in first[:2] if n]
    for plan in plans:
        stage = extract_stage(extractor, plan, dim_names)
        if plan.index > 0:
            narrow_stage(stage, plan, set(graph_inputs), shapes)
        if weights_dir is not None:
            load_external_data_for_model(stage, str(weights_dir))
        yield stage


def _dims(value: Any) -> tuple[Any, ...] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
    )


def narrow_stage(
    stage: Any,
    plan: StagePlan,
    graph_inputs: set[str],
    shapes: dict[str, tuple[Any, ...] | None],
) -> None:
    """Point a later stage's shape reads at its own tensors, prune, and refuse what is left.

    ``shapes``: the whole model's symbolic dims. Updates ``plan.inputs`` and
    ``plan.weight_bytes`` to the narrowed graph.
    """
    graph = stage.graph
    inputs = {v.name for v in graph.input}
    own = set(range(plan.first_layer, plan.last_layer + 1))
    hidden = [
        name
        for name in plan.inputs
        if name not in graph_inputs and len(shapes.get(name) or ()) == 3
    ]
    hidden_dims = shapes.get(hidden[0]) if hidden else None
    redirected = 0
    for node in graph.node:
        if node.op_type != "Shape" or not node.input:
            continue
        source = node.input[0]
        match = PAST_RE.match(source)
        if match and int(match.group(1)) not in own:
            mine = f"past_key_values.{plan.first_layer}.{match.group(2)}"
            if mine in inputs and _same_static(shapes.get(source), shapes.get(mine)):
                node.input[0] = mine
                redirected += 1
            continue
        dims = shapes.get(source)
        if (
            hidden_dims is not None
            and source not in hidden
            and dims is not None
            and len(dims) in (2, 3)
            and all(d is not None for d in dims)
            and dims == hidden_dims[: len(dims)]
        ):
            _reslice_shape(node, len(dims))
            node.input[0] = hidden[0]
            redirected += 1
    prune(graph)
    foreign = [
        v.name
        for v in graph.input
        if (m := PAST_RE.match(v.name)) is not None and int(m.group(1)) not in own
    ]
    if foreign:
        raise InputError(
            f"stage {plan.index} (blocks {plan.first_layer}-{plan.last_layer}) still reads "
            f"{', '.join(foreign)} beyond its shape; this decoder graph cannot be cut into "
            "stages that each hold only their own KV cache"
        )
    plan.inputs = [v.name for v in graph.input]
    plan.weight_bytes = sum(initializer_bytes(graph).values())
    log.debug("stage %d: %d shape reads redirected", plan.index, redirected)


def _same_static(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    """Same rank and the same fixed sizes (heads, head dim): the shapes differ only in
    dims both take from the batch and the past length."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(
        x == y for x, y in zip(a, b, strict=True) if isinstance(x, int) or isinstance(y, int)
    )


def _reslice_shape(node: Any, rank: int) -> None:
    """Make ``Shape(x)`` of a rank-``rank`` tensor read the same dims off a longer tensor."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    start, end = int(attrs.get("start", 0)), int(attrs.get("end", rank))
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    del node.attribute[:]
    node.attribute.extend(
        [helper.make_attribute("start", start), helper.make_attribute("end", end)]
    )


def prune(graph: Any) -> None:
    """Drop nodes, weights and inputs nothing reaches from the graph outputs."""
    used = {v.name for v in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(name in used for name in node.output):
            keep.append(node)
            used.update(n for n in node.input if n)
            used.update(_subgraph_reads(node))
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    weights = [w for w in graph.initializer if w.name in used]
    del graph.initializer[:]
    graph.initializer.extend(weights)
    inputs = [v for v in graph.input if v.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    produced = {n for node in graph.node for n in node.output}
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _subgraph_reads(node: Any) -> set[str]:
    """Names a control-flow node's subgraphs read from the outer scope (conservatively all)."""
    from onnx import AttributeProto

    names: set[str] = set()
    for attr in node.attribute:
        graphs = (
            [attr.g]
            if attr.type == AttributeProto.GRAPH
            else list(attr.graphs)
            if attr.type == AttributeProto.GRAPHS
            else []
        )
        for sub in graphs:
            for inner in sub.node:
                names.update(n for n in inner.input if n)
                names.update(_subgraph_reads(inner))
    return names
