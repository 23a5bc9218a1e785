"""Pipeline stages on CPU: all-MiniLM-L6-v2 cut into 2 and 3 stage engines, one CPU worker each.

The staged engine must pass the fp32 gate against PyTorch, equal the unsplit engine, give the
same outputs micro-batched or not, and report itself (inspect, bubble per stage).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trtpipe.cli.main import cli
from trtpipe.compare import Tolerances, compare_engine
from trtpipe.devices import Device, pipeline_groups
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError
from trtpipe.runners import runner_for
from trtpipe.runners.pipeline import PipelineRunner

CPU = [Device("cpu", i) for i in range(3)]
SHAPES = ["--opt-shapes", "input_ids:4x16", "--max-shapes", "input_ids:8x64"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def two_stages(minilm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineDir:
    """Balanced by weight bytes (the default)."""
    out = tmp_path_factory.mktemp("pp2") / "minilm-pp2"
    code, text = invoke(
        "build", str(minilm_onnx), "--backend", "onnxruntime", "--pipeline-stages", "2",
        *SHAPES, "-o", str(out),
    )  # fmt: skip
    assert code == 0, text
    return EngineDir(out)


@pytest.fixture(scope="module")
def three_stages(minilm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineDir:
    out = tmp_path_factory.mktemp("pp3") / "minilm-pp3"
    code, text = invoke(
        "build", str(minilm_onnx), "--backend", "onnxruntime", "--pipeline-stages", "3",
        "--stage-layers", "0-1,2-3,4-5", *SHAPES, "-o", str(out),
    )  # fmt: skip
    assert code == 0, text
    return EngineDir(out)


def padded_feeds(engine: EngineDir, batch: int = 8) -> dict[str, np.ndarray]:
    """Real sentences of different lengths (so padding is exercised)."""
    from trtpipe.text import encode, load_tokenizer, sample_texts

    tokenizer = load_tokenizer(str(engine.path))
    return encode(tokenizer, sample_texts()[:batch], engine.manifest.inputs, max_length=64)


def test_layout_and_manifest(two_stages: EngineDir, three_stages: EngineDir):
    stages = two_stages.manifest.stages
    # Balanced by bytes: the 47.7 MB embedding table outweighs blocks, so stage 0 is
    # embeddings + block 0 and stage 1 the other five blocks (7.1 MB each).
    assert [s["layers"] for s in stages] == [[0, 0], [1, 5]]
    assert stages[1]["weight_bytes"] == 5 * 7_097_856
    assert stages[0]["weight_bytes"] > 47_000_000
    assert [s["layers"] for s in three_stages.manifest.stages] == [[0, 1], [2, 3], [4, 5]]
    for engine in (two_stages, three_stages):
        dirs = engine.stage_dirs()
        assert [d.path.name for d in dirs] == [str(i) for i in range(len(dirs))]
        assert all(d.manifest.backend == "onnxruntime" and not d.manifest.stages for d in dirs)
        # Each later stage takes the previous stage's hidden state (plus the mask inputs).
        for before, after in itertools.pairwise(dirs):
            boundary = [o.name for o in before.manifest.outputs]
            assert boundary and set(boundary) <= {i.name for i in after.manifest.inputs}
            hidden = after.manifest.input(boundary[0])
            assert hidden.dtype == "float32" and hidden.shape == [-1, -1, 384]
            assert after.manifest.profile[hidden.name].max == [8, 64, 384]
        assert [o.name for o in engine.manifest.outputs] == [
            "token_embeddings",
            "sentence_embedding",
        ]
    data = json.loads((three_stages.path / "manifest.json").read_text())
    assert [s["path"] for s in data["stages"]] == ["stages/0", "stages/1", "stages/2"]


@pytest.mark.parametrize("fixture, devices", [("two_stages", CPU[:2]), ("three_stages", CPU)])
def test_fp32_gate_on_cpu_workers(request: pytest.FixtureRequest, fixture: str, devices):
    engine = request.getfixturevalue(fixture)
    report = compare_engine(engine, Tolerances.for_precision("fp32"), device=devices)
    assert report.passed, report.table()
    assert report.outputs["sentence_embedding"].max_abs < 1e-4
    assert report.samples > 8


@pytest.mark.parametrize("fixture", ["two_stages", "three_stages"])
def test_equals_unsplit_engine(
    request: pytest.FixtureRequest, fixture: str, minilm_serving_engine: Path
):
    engine = request.getfixturevalue(fixture)
    feeds = padded_feeds(engine)
    assert feeds["attention_mask"].min() == 0  # some rows are padded
    with runner_for(minilm_serving_engine) as whole, runner_for(engine, CPU[0]) as staged:
        assert isinstance(staged, PipelineRunner)
        assert staged.devices == CPU[: len(engine.manifest.stages)]
        want, got = whole.infer(feeds), staged.infer(feeds)
    for name in ("token_embeddings", "sentence_embedding"):
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)


def test_micro_batches_equal_whole_batch_and_bubble(three_stages: EngineDir):
    feeds = padded_feeds(three_stages, batch=8)
    with runner_for(three_stages, CPU) as runner:
        assert isinstance(runner, PipelineRunner)
        runner.micro_batches = 1
        naive = runner.infer(feeds)
        stats_naive = runner.last_stats
        runner.micro_batches = 4
        piped = runner.infer(feeds)
        stats_piped = runner.last_stats
    for name in naive:
        np.testing.assert_allclose(piped[name], naive[name], atol=1e-6, rtol=0)
    assert stats_naive.micro_batches == 1 and stats_piped.micro_batches == 4
    for stats in (stats_naive, stats_piped):
        assert len(stats.busy_s) == 3 and all(b > 0 for b in stats.busy_s)
        assert all(b <= stats.wall_s for b in stats.busy_s)
        assert all(0.0 <= share < 1.0 for share in stats.bubble())
    # Naive: each stage works only while the others wait, so busy times add up to the wall.
    assert sum(stats_naive.busy_s) <= stats_naive.wall_s


def test_inspect_lists_stages(three_stages: EngineDir):
    code, text = invoke("inspect", str(three_stages.path))
    assert code == 0, text
    assert "stages       3" in text
    for stage in three_stages.manifest.stages:
        mb = f"{stage['weight_bytes'] / 1e6:.1f} MB"
        first, last = stage["layers"]
        row = next(line for line in text.splitlines() if line.startswith(stage["path"]))
        assert f"{first}-{last}" in row and mb in row


def test_device_groups():
    gpus = [Device("cuda", i) for i in range(4)]
    assert pipeline_groups(gpus, 2) == [gpus[:2], gpus[2:]]
    with pytest.raises(InputError, match="multiple of 2"):
        pipeline_groups(CPU, 2)


def test_wrong_device_count_is_one_clear_error(two_stages: EngineDir):
    with pytest.raises(InputError, match="needs 2 different devices"):
        runner_for(two_stages, CPU)
    with pytest.raises(InputError, match="one engine"):
        runner_for(two_stages.stage_dirs()[0], CPU[:2])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pipeline-stages", "7"], "the model has 6 blocks"),
        (["--stage-layers", "0-2,4-5"], "should start at 3"),
        (["--pipeline-stages", "3", "--stage-layers", "0-2,3-5"], "gives 2 stages"),
    ],
)
def test_bad_stage_options(minilm_onnx: Path, tmp_path: Path, args: list[str], message: str):
    out = tmp_path / "engine"
    code, text = invoke(
        "build", str(minilm_onnx), "--backend", "onnxruntime", *args, "-o", str(out)
    )
    assert code == 2 and message in text and "Traceback" not in text, text
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_stage_too_large_for_its_device(two_stages: EngineDir, monkeypatch: pytest.MonkeyPatch):
    """The load-time memory check: weights over the free memory are refused, naming the stage."""
    import trtpipe.runners.pipeline as pipeline

    stages = two_stages.manifest.stages
    total = sum(s["weight_bytes"] for s in stages)
    # CPU workers share the host RAM: all CPU stages' weights count against it.
    monkeypatch.setattr(pipeline, "free_bytes", lambda device: total - 1)
    runner = runner_for(two_stages, CPU[:2])
    with pytest.raises(InputError, match=r"stage 0 \(blocks \[0, 0\]\) does not fit cpu:0"):
        runner.load()
    assert not runner.loaded and runner.stage_runners == []
    # GPUs are checked per stage: stage 1 (35.5 MB) fits 40 MB, stage 0 (54.8 MB) does not.
    monkeypatch.setattr(pipeline, "free_bytes", lambda device: 40_000_000)
    gpus = [Device("cuda", 0), Device("cuda", 1)]
    with pytest.raises(InputError, match=r"stage 0 .* does not fit cuda:0: stage 0's weights"):
        pipeline.check_stage_memory(stages, gpus)
    pipeline.check_stage_memory(stages[1:], gpus[1:])  # fits: no error
    monkeypatch.setattr(pipeline, "free_bytes", lambda device: total)
    pipeline.check_stage_memory(stages, CPU[:2])


def test_external_weights_read_per_stage(
    minilm_onnx: Path, tmp_path: Path, minilm_serving_engine: Path
):
    """An export with its weights in model.onnx_data (as large models come) is cut from the
    graph alone; each stage reads only its own weights and the outputs are unchanged."""
    import shutil

    import onnx

    src = tmp_path / "onnx"
    src.mkdir()
    for path in minilm_onnx.parent.iterdir():
        if path.is_file() and path.suffix != ".onnx" and not path.name.endswith("_data"):
            shutil.copyfile(path, src / path.name)
    onnx.save_model(
        onnx.load(str(minilm_onnx)),
        str(src / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx_data",
        size_threshold=1024,
    )
    assert (src / "model.onnx").stat().st_size < 1_000_000  # the graph only
    out = tmp_path / "pp2"
    code, text = invoke(
        "build", str(src / "model.onnx"), "--backend", "onnxruntime", "--stage-layers", "0-2,3-5",
        *SHAPES, "-o", str(out),
    )  # fmt: skip
    assert code == 0, text
    engine = EngineDir(out)
    assert [s["layers"] for s in engine.manifest.stages] == [[0, 2], [3, 5]]
    assert engine.manifest.stages[1]["weight_bytes"] == 3 * 7_097_856
    feeds = padded_feeds(engine)
    with runner_for(minilm_serving_engine) as whole, runner_for(engine, CPU[:2]) as staged:
        want, got = whole.infer(feeds), staged.infer(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)


def test_fp16_stages_pass_the_fp16_gate(minilm_onnx: Path, tmp_path: Path):
    """fp16 per stage: each stage's AutoCast reference inputs are the boundary activations of
    the fp32 stages before it on real text, and the chain passes the fp16 gate."""
    out = tmp_path / "pp2-fp16"
    code, text = invoke(
        "build", str(minilm_onnx), "--backend", "onnxruntime", "--fp16",
        "--stage-layers", "0-2,3-5", *SHAPES, "-o", str(out),
    )  # fmt: skip
    assert code == 0, text
    engine = EngineDir(out)
    assert engine.manifest.precision == "fp16"
    assert [d.manifest.precision for d in engine.stage_dirs()] == ["fp16", "fp16"]
    report = compare_engine(engine, Tolerances.for_precision("fp16"), device=CPU[:2])
    assert report.passed, report.table()
    assert report.outputs["sentence_embedding"].cosine_min >= 0.999


def test_device_pool_runs_one_pipeline_replica_per_device_group(two_stages: EngineDir):
    """cpu:0..3 with 2 stages = 2 replicas (cpu:0-1, cpu:2-3), each answering like one runner."""
    from trtpipe.runtime.pool import DevicePool

    feeds = padded_feeds(two_stages)
    reference = runner_for(two_stages, [Device("cpu", 0), Device("cpu", 1)])
    with reference:
        expected = reference.infer(feeds)
    pool = DevicePool.for_engine(
        two_stages, [Device("cpu", i) for i in range(4)], policy="round_robin"
    )
    with pool:
        assert [s["device"] for s in pool.devices_status()] == ["cpu:0", "cpu:2"]
        for _ in range(2):  # dealt to each replica in turn
            got = pool.run_sync(feeds)
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, atol=1e-6)
        assert [s["executions"] for s in pool.devices_status()] == [1, 1]
    with pytest.raises(InputError, match="do not divide into pipeline replicas of 2"):
        DevicePool.for_engine(two_stages, [Device("cpu", i) for i in range(3)])
