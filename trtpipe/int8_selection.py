"""Which quantized nodes to keep in fp32, chosen by their effect on the model's outputs.

Greedy, from everything quantized: each step keeps in fp32 the node whose un-quantization most
raises the calibration text's tail cosine (the mean of the worst 2% of rows of every output,
real tokens only), until the worst row reaches a target cosine or a node budget is spent. A
node's error can be small where it happens and large downstream (MiniLM's first FFN
down-projection), so a local per-node measure misses what this one sees. The tail rather
than the single worst row steers the choice: measured on MiniLM, steering by one row chases
that row (attention nodes) and generalizes worse to other text.

It stays cheap because every candidate is evaluated in one ONNX Runtime session: a
"switchable" model holds both the real INT8 subgraph and the fp32 node for every candidate,
joined by a ``Where`` on a boolean input, so trying a set of nodes is one run with different
feeds, with ONNX Runtime's own INT8 kernels (no simulated quantization). The fp32 reference
is the same session with every switch off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SWITCH_SUFFIX = "/use_int8"
# Share of rows, per output, whose mean cosine steers the greedy choice.
TAIL = 0.02


@dataclass
class Selection:
    """The nodes kept in fp32 and what they bought on the calibration text."""

    kept_fp32: list[str]
    cosine_min: float
    cosine_tail: float
    cosine_min_all_int8: float
    evaluations: int
    seconds: float
    steps: list[dict[str, Any]] = field(default_factory=list)


def switchable_model(fp32: Any, quantized: Any, nodes: list[Any]) -> tuple[Any, list[str]]:
    """``quantized`` with an fp32 twin of each of ``nodes`` selected by a bool input.

    The quantizer keeps each node's output name on the last node of its INT8 subgraph; that
    output is renamed, the fp32 node is added beside it, and ``Where(switch, int8, fp32)``
    writes the original name. Returns the model and the switch input names, in node order.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    present = {i.name for i in graph.initializer}
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output}
    extra: dict[int, list[Any]] = {}
    switches = []
    for node in nodes:
        out = node.output[0]
        index = producer.get(out)
        if index is None:
            raise ValueError(f"quantized graph has no producer of {out!r}")
        last = graph.node[index]
        last.output[list(last.output).index(out)] = f"{out}/int8"
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name = f"{node.name}/fp32"
        twin.output[0] = f"{out}/fp32"
        for name in node.input:
            if name in fp32_inits and name not in present:
                graph.initializer.append(fp32_inits[name])
                present.add(name)
        switch = f"{node.name}{SWITCH_SUFFIX}"
        graph.input.append(helper.make_tensor_value_info(switch, TensorProto.BOOL, []))
        where = helper.make_node(
            "Where", [switch, f"{out}/int8", f"{out}/fp32"], [out], name=f"{node.name}/select"
        )
        extra[index] = [twin, where]
        switches.append(switch)
    ordered = []
    for i, n in enumerate(graph.node):
        ordered.append(n)
        ordered.extend(extra.get(i, []))
    del graph.node[:]
    graph.node.extend(ordered)
    return model, switches


def row_cosines(
    got: dict[str, np.ndarray], ref: dict[str, np.ndarray], mask: np.ndarray | None
) -> list[np.ndarray]:
    """Row cosines per output (per-token outputs: real tokens only)."""
    from trtpipe.compare import cosine_rows, row_pairs

    return [
        np.concatenate([cosine_rows(a, b) for a, b in row_pairs(got[name], value, mask)])
        for name, value in ref.items()
    ]


def tail_and_min(cosines: list[np.ndarray], tail: float = TAIL) -> tuple[float, float]:
    """(lowest mean of an output's worst ``tail`` rows, lowest row) over all outputs."""
    tails = []
    for rows in cosines:
        count = max(1, round(tail * rows.size))
        tails.append(float(np.sort(rows)[:count].mean()))
    return min(tails), min(float(rows.min()) for rows in cosines)


def select_fp32_nodes(
    fp32: Any,
    quantized: Any,
    nodes: list[Any],
    feeds: dict[str, np.ndarray],
    target: float,
    budget: int,
) -> Selection:
    """Greedy end-to-end choice of at most ``budget`` of ``nodes`` to keep in fp32."""
    import onnxruntime as ort

    start = time.perf_counter()
    model, switches = switchable_model(fp32, quantized, nodes)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    wanted = {i.name for i in session.get_inputs()}
    base = {k: v for k, v in feeds.items() if k in wanted}
    outputs = [o.name for o in session.get_outputs()]
    mask = feeds.get("attention_mask")
    true, false = np.array(True), np.array(False)

    def run(int8: list[bool]) -> dict[str, np.ndarray]:
        flags = {s: (true if q else false) for s, q in zip(switches, int8, strict=True)}
        return dict(zip(outputs, session.run(outputs, {**base, **flags}), strict=True))

    reference = run([False] * len(nodes))

    def measure(int8: list[bool]) -> tuple[float, float]:
        return tail_and_min(row_cosines(run(int8), reference, mask))

    state = [True] * len(nodes)
    tail, worst = measure(state)
    selection = Selection([], worst, tail, worst, 2, 0.0)
    while worst < target and len(selection.kept_fp32) < budget:
        best, best_tail, best_worst = -1, -2.0, -2.0
        for i, quantized_now in enumerate(state):
            if not quantized_now:
                continue
            trial = list(state)
            trial[i] = False
            trial_tail, trial_worst = measure(trial)
            selection.evaluations += 1
            if (trial_tail, trial_worst) > (best_tail, best_worst):
                best, best_tail, best_worst = i, trial_tail, trial_worst
        if best < 0:
            break
        state[best] = False
        tail, worst = best_tail, best_worst
        name = nodes[best].name
        selection.kept_fp32.append(name)
        selection.steps.append(
            {"keep_fp32": name, "cosine_tail": round(tail, 6), "cosine_min": round(worst, 6)}
        )
        log.info("int8 selection: %s kept fp32; calibration tail %.4f, min %.4f", name, tail, worst)
    selection.cosine_min, selection.cosine_tail = worst, tail
    selection.seconds = time.perf_counter() - start
    return selection
