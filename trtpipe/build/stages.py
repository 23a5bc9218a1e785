"""Cut an exported transformer graph at block boundaries into pipeline stage graphs.

Nodes are placed by the block index in their names (``/0/encoder/layer.3/...``,
``/model/layers.3/...``, ``/transformer/h.3/...``); other nodes follow their producers. A stage
takes from earlier stages only the tensors its blocks read (the hidden state), and recomputes
from the graph inputs what is cheap and shared (the attention-mask preparation), so each stage
graph is a plain model the ordinary precision and build steps accept. Extraction is
``onnx.utils.Extractor``: the stage graph keeps only its own nodes and weights.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtpipe.errors import InputError

log = logging.getLogger(__name__)

# "layer.3", "layers.3", "h.3", "block.3" / "blocks.3" as one path component of a node name.
_BLOCK = re.compile(r"(?:^|/)(?:layer|layers|h|block|blocks)\.(\d+)(?:/|$)")
STAGES_DIR = "stages"


@dataclass
class StagePlan:
    """One stage: its blocks (inclusive range), its graph I/O and its weight bytes."""

    index: int
    first_layer: int
    last_layer: int
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    weight_bytes: int = 0

    @property
    def layers(self) -> list[int]:
        return [self.first_layer, self.last_layer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": f"{STAGES_DIR}/{self.index}",
            "layers": self.layers,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "weight_bytes": self.weight_bytes,
        }


def block_index(node_name: str) -> int | None:
    match = _BLOCK.search(node_name)
    return int(match.group(1)) if match else None


def node_positions(graph: Any) -> list[int]:
    """Block position of each node: its own block, else the latest block it reads from.

    -1 means the node depends on no block (embeddings, mask preparation, constants).
    """
    produced_at: dict[str, int] = {}
    positions = []
    for node in graph.node:
        own = block_index(node.name)
        from_inputs = max((produced_at.get(name, -1) for name in node.input if name), default=-1)
        pos = own if own is not None and own >= from_inputs else from_inputs
        positions.append(pos)
        for name in node.output:
            produced_at[name] = pos
    return positions


def initializer_bytes(graph: Any) -> dict[str, int]:
    """Bytes of each weight, from its dims and element type (no copy of the data)."""
    import numpy as np
    from onnx import helper

    sizes = {}
    for init in graph.initializer:
        count = int(np.prod(init.dims)) if init.dims else 1
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        sizes[init.name] = count * itemsize
    return sizes


def layer_weight_bytes(model: Any) -> tuple[int, list[int], int]:
    """(bytes before the first block, bytes per block, bytes after the last block)."""
    graph = model.graph
    sizes = initializer_bytes(graph)
    positions = node_positions(graph)
    blocks = [
        p for p, n in zip(positions, graph.node, strict=True) if block_index(n.name) is not None
    ]
    if not blocks:
        raise InputError(
            "--pipeline-stages: no transformer blocks found in the graph (node names with "
            "layer.N / layers.N / h.N); this graph cannot be cut into stages"
        )
    count = max(blocks) + 1
    owner: dict[str, int] = {}  # first block (or -1 / count) that reads each weight
    for pos, node in zip(positions, graph.node, strict=True):
        where = pos if block_index(node.name) is not None else (-1 if pos < 0 else count)
        for name in node.input:
            if name in sizes and name not in owner:
                owner[name] = where
    per_layer = [0] * count
    pre = post = 0
    for name, where in owner.items():
        if where < 0:
            pre += sizes[name]
        elif where >= count:
            post += sizes[name]
        else:
            per_layer[where] += sizes[name]
    return pre, per_layer, post


def parse_stage_layers(text: str, layers: int) -> list[tuple[int, int]]:
    """``0-2,3-5`` -> [(0, 2), (3, 5)]: contiguous, covering every block once."""
    ranges = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last if sep else first)
        except ValueError:
            raise InputError(f"bad --stage-layers {text!r}: use ranges such as 0-2,3-5") from None
        ranges.append((lo, hi))
    expected = 0
    for lo, hi in ranges:
        if lo != expected or hi < lo:
            raise InputError(
                f"--stage-layers {text!r} must cover blocks 0..{layers - 1} in order, each once "
                f"(the next range should start at {expected})"
            )
        expected = hi + 1
    if expected != layers:
        raise InputError(
            f"--stage-layers {text!r} covers {expected} blocks, the model has {layers}"
        )
    return ranges


def balance_by_bytes(
    pre: int, per_layer: list[int], post: int, stages: int
) -> list[tuple[int, int]]:
    """Contiguous block ranges minimising the largest stage's weight bytes (linear partition)."""
    n = len(per_layer)
    if not 1 <= stages <= n:
        raise InputError(f"--pipeline-stages {stages}: the model has {n} blocks (1..{n} stages)")
    weights = list(per_layer)
    weights[0] += pre
    weights[-1] += post
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    # best[k][i]: (largest stage, sum of squares) putting blocks [0, i) into k stages; the
    # second key spreads the stages that do not set the maximum evenly too.
    inf = (float("inf"), float("inf"))
    best: list[list[tuple[float, float]]] = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                size = float(prefix[i] - prefix[j])
                cost = (max(best[k - 1][j][0], size), best[k - 1][j][1] + size * size)
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    ranges = []
    end = n
    for k in range(stages, 0, -1):
        start = cut[k][end]
        ranges.append((start, end - 1))
        end = start
    return ranges[::-1]


def plan_stages(model: Any, stages: int, stage_layers: str | None = None) -> list[StagePlan]:
    """Block ranges per stage (given, or balanced by weight bytes), with each stage's I/O."""
    pre, per_layer, post = layer_weight_bytes(model)
    if stage_layers:
        ranges = parse_stage_layers(stage_layers, len(per_layer))
        if stages and len(ranges) != stages:
            raise InputError(
                f"--stage-layers gives {len(ranges)} stages but --pipeline-stages is {stages}"
            )
    else:
        ranges = balance_by_bytes(pre, per_layer, post, stages)
    plans = [StagePlan(i, lo, hi) for i, (lo, hi) in enumerate(ranges)]
    _fill_io(model.graph, plans)
    return plans


def _fill_io(graph: Any, plans: list[StagePlan]) -> None:
    """Each stage's outputs (what later stages read) and inputs (graph inputs and earlier
    stages' outputs it reaches walking back from its outputs)."""
    positions = node_positions(graph)
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            producer[name] = i
    graph_outputs = [v.name for v in graph.output]

    def stage_of(pos: int) -> int:
        for plan in plans:
            if pos <= plan.last_layer:
                return plan.index if pos >= 0 else -1
        return plans[-1].index

    node_stage = [stage_of(p) for p in positions]
    # Tensors a block-dependent node of stage s makes and a node of a later stage reads.
    for node_index, node in enumerate(graph.node):
        for name in node.input:
            src = producer.get(name)
            if src is None or node_stage[src] < 0 or node_stage[src] >= node_stage[node_index]:
                continue
            made_by = plans[node_stage[src]]
            if name not in made_by.outputs:
                made_by.outputs.append(name)
    plans[-1].outputs = list(graph_outputs)
    fill_stage_inputs(graph, plans, producer)


def fill_stage_inputs(graph: Any, plans: list[StagePlan], producer: dict[str, int]) -> None:
    """Each stage's inputs: the graph inputs and earlier stages' outputs it reaches walking
    back from its own outputs (graph inputs first, in the graph's order)."""
    order = {v.name: i for i, v in enumerate(graph.input)}
    available: set[str] = set()
    for plan in plans:
        needed: list[str] = []
        seen: set[str] = set()
        stack = list(plan.outputs)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in available or (name in order and name not in producer):
                needed.append(name)
                continue
            src = producer.get(name)
            if src is not None:
                stack.extend(n for n in graph.node[src].input if n)
        plan.inputs = sorted(needed, key=lambda n: (n not in order, order.get(n, 0), n))
        available.update(plan.outputs)


def extract_stage(extractor: Any, plan: StagePlan, dim_names: dict[str, list[str]]) -> Any:
    """The stage graph: only the nodes and weights between its inputs and outputs.

    Boundary tensors get the batch/sequence dim names of the graph inputs, so the ordinary
    profile code gives them the same ranges.
    """

    model = extractor.extract_model(plan.inputs, plan.outputs)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in dim_names:
            continue
        dims = value.type.tensor_type.shape.dim
        names = dim_names.get("__hidden__", [])
        for axis, dim in enumerate(dims):
            if not dim.HasField("dim_value") and axis < len(names):
                dim.dim_param = names[axis]
    plan.weight_bytes = sum(initializer_bytes(model.graph).values())
    return model


def stage_models(
    model: Any, plans: list[StagePlan], weights_dir: Path | None = None
) -> Iterator[Any]:
    """One ONNX model per stage plan, made one at a time.

    ``model`` may be loaded without its external weights (``load_external_data=False``):
    the cut needs only the graph, and each stage then reads just its own weights from
    ``weights_dir``, so a model larger than memory is never loaded whole.
    """
    import onnx.shape_inference
    import onnx.utils
    from onnx.external_data_helper import load_external_data_for_model

    # The extractor needs the types of the boundary tensors: shape inference gives them.
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    dim_names: dict[str, list[str]] = {}
    for value in model.graph.input:
        dim_names[value.name] = [d.dim_param for d in value.type.tensor_type.shape.dim]
    first = next(iter(dim_names.values()), [])
    # Boundary hidden states are [batch, sequence, hidden]: name the dynamic ones like the inputs.
    dim_names["__hidden__"] = [n for n in first[:2] if n]
    for plan in plans:
        stage = extract_stage(extractor, plan, dim_names)
        if weights_dir is not None:
            load_external_data_for_model(stage, str(weights_dir))
        yield stage
