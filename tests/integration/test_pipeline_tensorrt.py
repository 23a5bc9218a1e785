"""Pipeline stages on the TensorRT path, with TensorRT and CUDA replaced by the strict test
doubles in tests/fakes and two fake GPUs (the fake engine computes with ONNX Runtime on CPU).

What this proves: ``build --pipeline-stages 2 --backend tensorrt`` makes one TensorRT engine per
stage; a PipelineRunner over cuda:0,cuda:1 allocates each stage's memory on its own device only,
moves the boundary hidden state device -> pinned host -> device (the fakes refuse any
cross-device use), gives the ONNX Runtime outputs, refuses a stage that does not fit its device
at load, and leaks nothing. It says nothing about real GPU speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests.fakes.install import FakeGpu, installed_fakes
from trtpipe.cli.main import cli
from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError
from trtpipe.runners import runner_for
from trtpipe.runners.pipeline import PipelineRunner

GPUS = [Device("cuda", 0), Device("cuda", 1)]
SHAPES = ["--opt-shapes", "input_ids:4x16", "--max-shapes", "input_ids:8x64"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.fixture
def two_gpus() -> Iterator[FakeGpu]:
    with installed_fakes(device_count=2) as handle:
        yield handle


@pytest.fixture(scope="module")
def trt_stages(tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineDir:
    """The 2-layer tiny BERT cut in two TensorRT stages (one block each)."""
    out = tmp_path_factory.mktemp("trt-pp2") / "engine"
    with installed_fakes(device_count=2) as gpu:
        code, text = invoke(
            "build", str(tiny_bert_onnx), "--backend", "tensorrt", "--pipeline-stages", "2",
            *SHAPES, "-o", str(out),
        )  # fmt: skip
        assert code == 0, text
        assert len(gpu.trt.BUILDS) == 2  # one TensorRT build per stage
        hidden_profile = gpu.trt.BUILDS[1]["profile"]
    engine = EngineDir(out)
    boundary = engine.manifest.stages[0]["outputs"][0]
    hidden = engine.stage_dirs()[1].manifest.input(boundary).shape[-1]
    # Stage 1's hidden-state input gets the whole model's batch/sequence ranges.
    assert hidden_profile[boundary] == [[1, 1, hidden], [4, 16, hidden], [8, 64, hidden]]
    return engine


@pytest.fixture(scope="module")
def ort_stages(tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineDir:
    out = tmp_path_factory.mktemp("ort-pp2") / "engine"
    code, text = invoke(
        "build", str(tiny_bert_onnx), "--backend", "onnxruntime", "--pipeline-stages", "2",
        *SHAPES, "-o", str(out),
    )  # fmt: skip
    assert code == 0, text
    return EngineDir(out)


def padded_feeds(batch: int = 8, seq: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(batch):
        mask[row, seq - 2 * row :] = 0  # rows padded by different amounts
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_layout(trt_stages: EngineDir):
    manifest = trt_stages.manifest
    assert manifest.backend == "tensorrt" and manifest.precision == "fp32"
    assert [s["layers"] for s in manifest.stages] == [[0, 0], [1, 1]]
    for index, stage in enumerate(trt_stages.stage_dirs()):
        assert stage.manifest.backend == "tensorrt" and not stage.manifest.stages
        assert stage.engine_path.name == "engine.plan" and stage.engine_path.is_file()
        assert stage.manifest.device["name"] == "Fake GPU (test double)"
        assert manifest.stages[index]["weight_bytes"] > 0
    assert manifest.device == trt_stages.stage_dirs()[0].manifest.device


def record_copies(gpu: FakeGpu, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """(direction, device of the stream, bytes) of every cudaMemcpyAsync the runners queue."""
    copies: list[tuple[str, int, int]] = []
    real = gpu.cuda.cudaMemcpyAsync
    kinds = gpu.cuda.cudaMemcpyKind

    def recording(dst: Any, src: Any, count: int, kind: Any, stream: Any) -> Any:
        result = real(dst, src, count, kind, stream)
        if int(result[0]) == 0:
            direction = "htod" if int(kind) == kinds.cudaMemcpyHostToDevice else "dtoh"
            live = gpu.state.live_stream(int(stream))
            assert live is not None
            copies.append((direction, live.device, int(count)))
        return result

    monkeypatch.setattr(gpu.cuda, "cudaMemcpyAsync", recording)
    return copies


def test_each_stage_on_its_own_gpu(
    two_gpus: FakeGpu,
    trt_stages: EngineDir,
    ort_stages: EngineDir,
    tiny_bert_engine: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    state = two_gpus.state
    feeds = padded_feeds()
    whole, cpu = runner_for(EngineDir(tiny_bert_engine)), runner_for(ort_stages, Device("cpu", 0))
    with whole, cpu:
        want, want_staged = whole.infer(feeds), cpu.infer(feeds)
    runner = runner_for(trt_stages, GPUS)
    assert isinstance(runner, PipelineRunner)
    runner.micro_batches = 4
    with runner:
        memory = [r.memory_bytes() for r in runner.stage_runners]  # type: ignore[attr-defined]
        assert [type(r).__name__ for r in runner.stage_runners] == ["TensorRTRunner"] * 2
        # Each stage's buffers on its own device and pinned for its own device's context.
        device, pinned = ([m[key] for m in memory] for key in ("device_buffers", "pinned_host"))
        assert state.device_bytes == {0: device[0], 1: device[1]}
        assert state.pinned_bytes == {0: pinned[0], 1: pinned[1]}
        assert {alloc.device for alloc in state.device_allocs.values()} == {0, 1}
        # cudaMemGetInfo answers per device: its limit less what lives there.
        for index in (0, 1):
            two_gpus.cuda.cudaSetDevice(index)
            err, free, total = two_gpus.cuda.cudaMemGetInfo()
            assert int(err) == 0 and total == state.total_memory
            assert free == total - device[index]
        copies = record_copies(two_gpus, monkeypatch)
        got = runner.infer(feeds)
        assert runner.last_stats.micro_batches == 4
    name = "last_hidden_state"
    assert got[name].shape == want[name].shape == (8, 24, want[name].shape[-1])
    np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[name], want_staged[name], atol=1e-5, rtol=0)
    # The boundary hidden state of each micro-batch (2 rows) leaves device 0 into pinned host
    # memory and enters device 1 from pinned host memory; nothing else crosses.
    boundary_bytes = 2 * 24 * want[name].shape[-1] * 4
    out_of_0 = [n for d, dev, n in copies if d == "dtoh" and dev == 0]
    into_1 = [n for d, dev, n in copies if d == "htod" and dev == 1]
    assert out_of_0 == [boundary_bytes] * 4
    assert into_1.count(boundary_bytes) == 4
    assert len([c for c in copies if c[1] == 0 and c[0] == "htod"]) == 4 * 3  # ids, mask, types
    assert two_gpus.leaks() == {"device": 0, "host": 0, "streams": 0}
    assert state.device_bytes == {0: 0, 1: 0} and state.pinned_bytes == {0: 0, 1: 0}


def test_stage_that_does_not_fit_its_gpu(two_gpus: FakeGpu, trt_stages: EngineDir):
    """The load-time check reads each device's free memory (cudaMemGetInfo): device 1 holding
    other allocations leaves too little for stage 1, and loading stops before any stage."""
    cuda = two_gpus.cuda
    stage_0, stage_1 = (s["weight_bytes"] for s in trt_stages.manifest.stages)
    total = two_gpus.state.total_memory = 2 * (stage_0 + stage_1)
    held = total - stage_1 + 1  # another process's share of device 1
    cuda.cudaSetDevice(1)
    err, other = cuda.cudaMalloc(held)
    assert int(err) == 0
    runner = runner_for(trt_stages, GPUS)
    with pytest.raises(InputError) as caught:
        runner.load()
    message = str(caught.value)
    assert "stage 1 (blocks [1, 1]) does not fit cuda:1: stage 1's weights" in message
    assert "--pipeline-stages" in message
    assert not runner.loaded and runner.stage_runners == []
    assert two_gpus.state.device_bytes == {1: held}  # nothing of ours was allocated
    cuda.cudaFree(other)
    with runner_for(trt_stages, GPUS) as fits:  # freed again: it loads and runs
        out = fits.infer(padded_feeds(batch=2, seq=8))
        assert out["last_hidden_state"].shape[:2] == (2, 8)
    assert two_gpus.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_cli_reports_the_stage_that_does_not_fit(two_gpus: FakeGpu, trt_stages: EngineDir):
    """The same check through a command: one error line, no traceback."""
    two_gpus.state.total_memory = trt_stages.manifest.stages[0]["weight_bytes"] - 1
    # One device names the group that starts there: cuda:0 -> cuda:0, cuda:1.
    result = CliRunner().invoke(cli, ["compare", str(trt_stages.path), "--device", "cuda:0"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "error: stage 0 (blocks [0, 0]) does not fit cuda:0" in result.output
    assert two_gpus.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_serve_on_four_gpus_is_two_pipeline_replicas(trt_stages: EngineDir, tiny_bert_engine: Path):
    """``serve ENGINE --gpus 0,1,2,3`` with 2 stages: replicas on cuda:0-1 and cuda:2-3, each
    request answered like the unsplit engine, every GPU holding its own stage's buffers."""
    import json

    from tests.server_utils import fetch, json_infer_body
    from trtpipe.devices import parse_gpus
    from trtpipe.server.app import InferenceServer, ServerConfig, ServerThread
    from trtpipe.server.config import ServeConfig
    from trtpipe.server.repository import ModelRepository

    feeds = padded_feeds(batch=4, seq=16, seed=3)
    with runner_for(EngineDir(tiny_bert_engine)) as whole:
        want = whole.infer(feeds)["last_hidden_state"]
    with installed_fakes(device_count=4) as gpu:
        # What the serve command makes of --gpus 0,1,2,3 (trtpipe.cli.serve).
        config = ServeConfig(devices=parse_gpus("0,1,2,3"), policy="round_robin")
        repository = ModelRepository.from_specs([f"bert={trt_stages.path}"], config)
        server = InferenceServer(repository, ServerConfig(http_port=0, grpc_port=None))
        with ServerThread(server):
            port = server.http_port
            assert port is not None
            status, body = fetch(port, "/v2/models/bert/ready")
            assert status == 200, body
            devices = [d["device"] for d in json.loads(body)["devices"]]
            assert devices == ["cuda:0", "cuda:2"]
            assert set(gpu.state.device_bytes) == {0, 1, 2, 3}
            assert all(n > 0 for n in gpu.state.device_bytes.values())
            for _ in range(2):  # dealt to each replica in turn
                status, body = fetch(port, "/v2/models/bert/infer", json_infer_body(feeds))
                assert status == 200, body
                (output,) = json.loads(body)["outputs"]
                got = np.array(output["data"], np.float32).reshape(output["shape"])
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            served = repository.get("bert").devices_status()
            assert [s["executions"] for s in served] == [1, 1]
        assert gpu.leaks() == {"device": 0, "host": 0, "streams": 0}


@pytest.mark.parametrize(
    "fixture, devices",
    [("trt_stages", ["--gpus", "0,1,2"]), ("ort_stages", ["--devices", "cpu:3"])],
)
def test_serve_refuses_devices_that_do_not_divide(
    request: pytest.FixtureRequest, fixture: str, devices: list[str]
):
    import socket

    engine = request.getfixturevalue(fixture)
    # A port this test holds: were the devices not refused first, serve would fail on the port
    # (a different message) rather than serve forever.
    with installed_fakes(device_count=3) as gpu, socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        result = CliRunner().invoke(
            cli, ["serve", str(engine.path), *devices, "--http-port", port, "--grpc-port", "0"]
        )
        assert gpu.leaks() == {"device": 0, "host": 0, "streams": 0}
    kind = "cuda" if fixture == "trt_stages" else "cpu"
    listed = ", ".join(f"{kind}:{i}" for i in range(3))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: 3 device(s) ({listed}) do not divide into pipeline replicas of 2 stages: "
        "give a multiple of 2 devices"
    ]


def test_pool_splits_the_cores_over_every_cpu_stage(ort_stages: EngineDir):
    """2 replicas x 2 CPU stages are 4 CPU workers on the same cores: each gets cores // 4
    intra-op threads (or --cpu-threads), not cores // 2 per replica."""
    from trtpipe.runtime.pool import DevicePool, cpu_cores

    cpus = [Device("cpu", i) for i in range(4)]
    for given, want in ((None, max(1, cpu_cores() // 4)), (3, 3)):
        pool = DevicePool.for_engine(ort_stages, cpus, threads_per_cpu_worker=given)
        runner = pool.runner_factory(Device("cpu", 2))
        assert isinstance(runner, PipelineRunner) and runner.devices == cpus[2:]
        with runner:
            assert [r.threads for r in runner.stage_runners] == [want, want]  # type: ignore[attr-defined]
    # serve --no-cpu-spin: the pool factory sets spin on the replica, which hands it on.
    from trtpipe.server.config import ServeConfig, default_pool_factory

    config = ServeConfig(devices=cpus, cpu_spin=False, warmup=False)
    runner = default_pool_factory(ort_stages, config).runner_factory(Device("cpu", 0))
    assert isinstance(runner, PipelineRunner) and runner.spin is False
    with runner:
        assert [r.spin for r in runner.stage_runners] == [False, False]  # type: ignore[attr-defined]


# ModelOpt probes for ``tensorrt`` when imported: it must be imported before the fakes go in.
MODELOPT = ("modelopt.onnx.quantization", "modelopt.onnx.trt_utils")


def test_int8_qdq_stages(tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path: Path):
    """``--int8`` for TensorRT: each stage is a ModelOpt Q/DQ graph (stage 1 calibrated on the
    fp32 hidden state of block 0), built strongly typed; the pipeline over two fake GPUs stays
    within the floor the unsplit int8 TensorRT engine is held to (test_tensorrt_fake.py)."""
    import onnx

    out = tmp_path / "int8"
    feeds = padded_feeds(batch=4, seq=20, seed=5)
    with runner_for(EngineDir(tiny_bert_engine)) as whole:
        want = whole.infer(feeds)["last_hidden_state"]
    with installed_fakes(device_count=2, preimport=MODELOPT) as gpu:
        code, text = invoke(
            "build", str(tiny_bert_onnx), "--backend", "tensorrt", "--int8",
            "--pipeline-stages", "2", *SHAPES, "-o", str(out),
        )  # fmt: skip
        assert code == 0, text
        engine = EngineDir(out)
        for received in gpu.trt.BUILDS:  # what each stage's builder parsed
            ops = [n.op_type for n in onnx.load_from_string(received["onnx_bytes"]).graph.node]
            assert ops.count("QuantizeLinear") >= 4 and "DequantizeLinear" in ops
        with runner_for(engine, GPUS) as runner:
            got = runner.infer(feeds)["last_hidden_state"]
        assert gpu.leaks() == {"device": 0, "host": 0, "streams": 0}
    assert [d.manifest.precision for d in engine.stage_dirs()] == ["int8", "int8"]
    # The Q/DQ graphs keep the export's dim names on the boundary (ModelOpt renames them).
    (boundary,) = engine.stage_dirs()[0].manifest.outputs
    assert boundary.dims[:2] == ["batch", "sequence"]
    assert engine.stage_dirs()[1].manifest.input(boundary.name).dims == boundary.dims
    methods = [d.manifest.build_options["precision"]["method"] for d in engine.stage_dirs()]
    assert methods == ["modelopt.quantize"] * 2
    rows = feeds["attention_mask"].astype(bool)
    a, b = got[rows], want[rows]  # real tokens only
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert got.shape == want.shape and cosine.min() >= 0.97
    assert not np.allclose(got, want, atol=1e-5)  # it really ran quantized
