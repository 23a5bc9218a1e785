"""Models whose weights live in external data (every export over 2 GB: ``model.onnx`` +
``model.onnx_data``), end to end on a tiny model forced into that layout (size_threshold=0).

For fp32, fp16 and int8 on ONNX Runtime, and fp16/int8 on TensorRT (the strict fakes, whose
parser reads external weights only from beside the model file, as the real one does): the
engine built from the external-data export computes what the engine built from the ordinary
export computes; an ONNX Runtime engine dir holds its own weights file, referenced relatively,
and still loads after it is moved; nothing stray is left beside the export or the engine.
The >2 GB run itself is scripts/big_decoder.py (figures in docs/generation.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.decoders import save_tiny_llama
from tests.fakes.install import installed_fakes
from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.onnx_files import external_data_files
from trtpipe.runners.onnxruntime import OnnxRuntimeRunner

PROMPTS = ["The King is dead. Long live the King.", "Once upon a time there was"]


def force_external(export: Path, target: Path) -> Path:
    """A copy of the export dir with every weight in ``model.onnx_data``."""
    import onnx

    shutil.copytree(export, target)
    model = onnx.load(str(target / "model.onnx"))
    onnx.save_model(
        model, str(target / "model.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0,
    )  # fmt: skip
    assert external_data_files(target / "model.onnx") == ["model.onnx_data"]
    assert (target / "model.onnx").stat().st_size < (target / "model.onnx_data").stat().st_size
    return target / "model.onnx"


def listing(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


@pytest.fixture(scope="module")
def llama_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trtpipe.export import export_model

    root = tmp_path_factory.mktemp("external-llama")
    model = save_tiny_llama(root / "model")
    inline = export_model(str(model), root / "inline", task="text-generation-with-past")
    return {"inline": inline, "external": force_external(inline.parent, root / "external")}


def prefill_feeds(engine: EngineDir) -> dict[str, np.ndarray]:
    from trtpipe.generation.prompts import decoder_feeds
    from trtpipe.text import load_tokenizer

    tokenizer = load_tokenizer(str(engine.path))
    return decoder_feeds(tokenizer, PROMPTS, engine.manifest.inputs, max_length=32)


def run_engine(path: Path) -> dict[str, np.ndarray]:
    engine = EngineDir(path)
    with OnnxRuntimeRunner(engine, Device("cpu")) as runner:
        return runner.infer(prefill_feeds(engine))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8-proxy"])
def test_onnxruntime_build_of_an_external_data_model(
    precision: str, llama_exports: dict[str, Path], tmp_path: Path
):
    """int8-proxy: the local-error selection probes activations with a graph written beside the
    weights (reading them in place), the path models over 2 GB take."""
    precision, _, selection = precision.partition("-")
    export_dir = llama_exports["external"].parent
    export_before = listing(export_dir)
    engines = {}
    for kind in ("inline", "external"):
        engines[kind] = build_engine_dir(
            BuildConfig(
                onnx_path=llama_exports[kind],
                output=tmp_path / "out" / kind,
                precision=precision,
                backend="onnxruntime",
                max_shapes={"input_ids": [4, 64]},
                int8_selection=selection or "greedy",
            )
        ).path
    built = engines["external"]
    # The engine dir holds its weights, beside the engine file and referenced by a bare name.
    assert external_data_files(built / "model.ort.onnx") == ["model.ort.onnx_data"]
    assert (built / "model.ort.onnx_data").stat().st_size > 10_000  # the weights, not a stub
    assert not any(p.name.endswith(("_data", ".data")) for p in engines["inline"].iterdir())
    assert external_data_files(engines["inline"] / "model.ort.onnx") == []
    # No typed intermediate, scratch dir or stray weights file in the engine, beside it, or in
    # the export dir (which is left exactly as it was).
    assert sorted(p.name for p in built.iterdir() if "onnx" in p.name) == [
        "model.ort.onnx",
        "model.ort.onnx_data",
    ]
    assert not [p for p in built.iterdir() if p.is_dir()]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["external", "inline"]
    assert listing(export_dir) == export_before
    # Same engine, same numbers: every output (logits and the KV cache) of a prefill.
    got, want = run_engine(built), run_engine(engines["inline"])
    assert sorted(got) == sorted(want) and len(got) > 1
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)
    logs = {k: json.loads((p / "build_log.json").read_text()) for k, p in engines.items()}
    if precision == "int8":
        kept = [log["precision"]["kept_fp32"] for log in logs.values()]
        assert kept[0] == kept[1]
        if selection == "proxy":
            assert kept[0]  # a fixed share of the nodes, chosen by the probe
        assert {log["precision"]["selection"] for log in logs.values()} == {selection or "greedy"}
        assert logs["external"]["op_counts"]["integer_ops"] > 0
    if precision == "fp16":
        assert logs["external"]["op_counts"]["by_output_dtype"].get("float16", 0) > 0
    # Self-contained: moved elsewhere, it still loads (the weights path is relative) and
    # generates what the ordinary engine generates.
    moved = tmp_path / "moved"
    shutil.move(str(built), moved)
    from trtpipe.generation import Generator, SamplingParams

    params = SamplingParams(6, greedy=True)
    with_moved, reference = Generator(moved), Generator(engines["inline"])
    try:
        got_ids = [r.token_ids for r in with_moved.generate(PROMPTS, params)]
        want_ids = [r.token_ids for r in reference.generate(PROMPTS, params)]
    finally:
        with_moved.close()
        reference.close()
    assert got_ids == want_ids and all(len(ids) == 6 for ids in got_ids)


def test_a_missing_weights_file_is_one_clear_error(llama_exports: dict[str, Path], tmp_path: Path):
    """An export copied without its ``model.onnx_data``: the build says what is missing."""
    from trtpipe.errors import TrtpipeError

    broken = tmp_path / "broken"
    shutil.copytree(llama_exports["external"].parent, broken)
    (broken / "model.onnx_data").unlink()
    with pytest.raises(TrtpipeError) as info:
        build_engine_dir(
            BuildConfig(
                onnx_path=broken / "model.onnx", output=tmp_path / "e", backend="onnxruntime"
            )
        )
    assert "model.onnx_data" in str(info.value)
    assert not (tmp_path / "e").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_build_of_an_external_data_model(
    precision: str, tiny_bert_onnx: Path, tmp_path: Path
):
    """fp16/int8 graphs keep their weights external, in ``<name>_data`` beside the typed graph
    (where the fake parser, like the real one, reads them), and build what the ordinary export
    builds. The precision step runs before the fakes go in (ModelOpt and the CUDA libraries it
    loads need the real modules), as in test_tensorrt_fake.py."""
    import onnx

    from trtpipe.build import calibration_feeds
    from trtpipe.build.profile import build_profile, onnx_io_specs
    from trtpipe.precision import apply_precision
    from trtpipe.runners import runner_for
    from trtpipe.text import sample_texts

    sources = {
        "inline": tiny_bert_onnx,
        "external": force_external(tiny_bert_onnx.parent, tmp_path / "external"),
    }
    inputs, _ = onnx_io_specs(onnx.load(str(tiny_bert_onnx)))
    profile = build_profile(inputs, {}, {"input_ids": [2, 16]}, {"input_ids": [8, 64]}, 128)
    calibration = calibration_feeds(tiny_bert_onnx.parent, sample_texts(), inputs, profile)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(3, 17), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    results, received = {}, {}
    for kind, source in sources.items():
        typed_dir = tmp_path / f"typed-{kind}"
        shutil.copytree(source.parent, typed_dir, ignore=shutil.ignore_patterns("model.onnx*"))
        side_files = {p.name for p in typed_dir.iterdir()}
        typed = typed_dir / "model.onnx"
        apply_precision(source, typed, precision, "tensorrt", calibration, work_dir=typed_dir)
        weights = {"model.onnx_data"} if kind == "external" else set()
        assert set(external_data_files(typed)) == weights
        assert {p.name for p in typed_dir.iterdir()} == side_files | {"model.onnx"} | weights
        with installed_fakes() as gpu:
            engine = build_engine_dir(
                BuildConfig(
                    onnx_path=typed,
                    output=tmp_path / f"engine-{kind}",
                    backend="tensorrt",
                    device=Device("cuda", 0),
                    max_shapes={"input_ids": [8, 64]},
                )
            )
            with runner_for(engine, Device("cuda", 0)) as runner:
                results[kind] = runner.infer(feeds)["last_hidden_state"]
            (received[kind],) = gpu.trt.BUILDS
        # The engine dir is the plan alone: no typed graph, no weights file, no scratch.
        assert not [p for p in engine.path.iterdir() if "onnx" in p.name or p.is_dir()]
    graphs = {k: onnx.load_from_string(v["onnx_bytes"]).graph for k, v in received.items()}
    ops = {k: sorted(n.op_type for n in g.node) for k, g in graphs.items()}
    assert ops["external"] == ops["inline"]
    dtypes = {k: sorted(i.data_type for i in g.initializer) for k, g in graphs.items()}
    assert dtypes["external"] == dtypes["inline"]
    if precision == "int8":
        assert ops["external"].count("QuantizeLinear") >= 6
    else:
        assert dtypes["external"].count(onnx.TensorProto.FLOAT16) >= 10
    np.testing.assert_allclose(results["external"], results["inline"], rtol=0, atol=1e-4)


def test_export_with_external_weights(
    tiny_bert_dir: Path, tiny_bert_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """optimum's switch for what every export over 2 GB does: the export dir holds the graph, one
    ``model.onnx_data`` beside it (no per-tensor files, no scratch), and the same function."""
    import onnxruntime as ort

    from trtpipe.export import ExportInfo, export_model

    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    onnx_path = export_model(str(tiny_bert_dir), tmp_path / "onnx")
    assert external_data_files(onnx_path) == ["model.onnx_data"]
    assert {p.name for p in onnx_path.parent.iterdir()} == {
        p.name for p in tiny_bert_onnx.parent.iterdir()
    } | {"model.onnx_data"}
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]
    assert ExportInfo.read(onnx_path.parent) == ExportInfo.read(tiny_bert_onnx.parent)
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 30000, size=(2, 9), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    got, want = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for p in (onnx_path, tiny_bert_onnx)
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_fp16_reference_run_in_place_decides_as_autocast_does(
    llama_exports: dict[str, Path], tmp_path: Path
):
    """Over external data, fp16 replaces AutoCast's reference run (several copies of the
    weights) with trtpipe.fp16_ranges (weights read in place): the graph must come out the
    same, node for node and tensor type for tensor type, as AutoCast's own run makes it."""
    import onnx

    from trtpipe.build import calibration_feeds
    from trtpipe.build.profile import build_profile, onnx_io_specs
    from trtpipe.fp16_ranges import DATA_MAX, tensor_absmax
    from trtpipe.precision import default_calibration_texts, to_fp16

    inputs, _ = onnx_io_specs(onnx.load(str(llama_exports["inline"]), load_external_data=False))
    profile = build_profile(inputs, {}, {}, {"input_ids": [4, 32]}, 64)
    feeds = calibration_feeds(
        llama_exports["inline"].parent, default_calibration_texts(), inputs, profile
    )
    absmax = tensor_absmax(llama_exports["external"], feeds)
    assert any(v.size and v[0] > DATA_MAX for v in absmax.values())  # the rule has work to do
    info = {}
    for kind in ("inline", "external"):
        info[kind] = to_fp16(llama_exports[kind], tmp_path / kind / "model.onnx", feeds)
    assert info["inline"]["reference_run"] == "autocast"
    assert info["external"]["reference_run"] == "trtpipe.fp16_ranges"
    graphs = {k: onnx.load(str(tmp_path / k / "model.onnx")).graph for k in info}

    def typed(graph) -> tuple[list, dict]:
        nodes = [(n.op_type, n.name, list(n.input), list(n.output)) for n in graph.node]
        types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
        types.update({t.name: t.data_type for t in graph.initializer})
        return nodes, types

    inline_nodes, inline_types = typed(graphs["inline"])
    assert sum(n[0] == "Cast" for n in inline_nodes) > 0
    assert typed(graphs["external"]) == (inline_nodes, inline_types)
