"""Staged decoders on the TensorRT path, with TensorRT and CUDA replaced by the strict test
doubles in tests/fakes and two fake GPUs (the fake engine computes with ONNX Runtime on CPU).

What this proves: ``build --backend tensorrt --pipeline-stages 2`` of the tiny Llama gives one
TensorRT engine per stage; the staged session over cuda:0,cuda:1 keeps each stage's engine
buffers and KV cache on its own device only (the fakes refuse any cross-device use), moves the
boundary hidden state device -> pinned host -> device and only the last stage's logits to the
host, gives the ONNX Runtime staged engine's and HF's greedy tokens (batched, left-padded),
keeps every request's tokens under the continuous-batching scheduler, and leaks nothing. It
says nothing about real GPU speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests.decoders import save_tiny_llama
from tests.fakes.install import FakeGpu, installed_fakes
from tests.integration.test_generation import PROMPTS, hf_greedy
from tests.integration.test_pipeline_decoder import MAX_BATCH, MAX_PAST, MAX_PROMPT
from trtpipe.cli.main import cli
from trtpipe.devices import Device
from trtpipe.engine import EngineDir

GPUS = [Device("cuda", 0), Device("cuda", 1)]
MAX_NEW = 12


def build(onnx_path: Path, out: Path, backend: str) -> EngineDir:
    import onnx

    from trtpipe.build.profile import onnx_io_specs

    inputs, _ = onnx_io_specs(onnx.load(str(onnx_path), load_external_data=False))
    past = next(s for s in inputs if s.name == "past_key_values.0.key")
    heads, head_dim = past.shape[1], past.shape[3]
    result = CliRunner().invoke(
        cli,
        [
            "build", str(onnx_path), "--backend", backend, "--pipeline-stages", "2",
            "--opt-shapes", "input_ids:4x16",
            "--max-shapes",
            f"input_ids:{MAX_BATCH}x{MAX_PROMPT},{past.name}:{MAX_BATCH}x{heads}x{MAX_PAST}x{head_dim}",
            "-o", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return EngineDir(out)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny Llama cut in 2 stages, built for TensorRT (under the fakes) and ONNX Runtime."""
    from trtpipe.export import export_model

    root = tmp_path_factory.mktemp("pp-trt-llama")
    model_dir = save_tiny_llama(root / "model")
    onnx_path = export_model(str(model_dir), root / "onnx", task="text-generation-with-past")
    with installed_fakes(device_count=2) as gpu:
        trt = build(onnx_path, root / "trt-pp2", "tensorrt")
        assert len(gpu.trt.BUILDS) == 2  # one TensorRT build per stage
    ort = build(onnx_path, root / "ort-pp2", "onnxruntime")
    return {"model": model_dir, "onnx": onnx_path, "trt": trt, "ort": ort}


@pytest.fixture
def two_gpus() -> Iterator[FakeGpu]:
    with installed_fakes(device_count=2) as handle:
        yield handle


def test_layout(llama: dict) -> None:
    engine: EngineDir = llama["trt"]
    assert engine.manifest.backend == "tensorrt"
    first, second = engine.stage_dirs()
    for stage in (first, second):
        assert stage.manifest.backend == "tensorrt" and stage.engine_path.name == "engine.plan"
    names0 = {s.name for s in first.manifest.inputs}
    names1 = {s.name for s in second.manifest.inputs}
    assert {"input_ids", "past_key_values.0.key"} <= names0 and "input_ids" not in names1
    assert {"past_key_values.1.key", "attention_mask"} <= names1
    assert "logits" in {o.name for o in second.manifest.outputs}
    assert "logits" not in {o.name for o in first.manifest.outputs}


@pytest.fixture(scope="module")
def ort_generator(llama: dict) -> Iterator[Any]:
    """The ONNX Runtime staged engine on two CPU workers: the reference."""
    from trtpipe.generation import Generator

    with Generator(llama["ort"], [Device("cpu", 0), Device("cpu", 1)]) as generator:
        yield generator


def record_copies(gpu: FakeGpu, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """(direction, device of the stream, bytes) of every cudaMemcpyAsync queued."""
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


def device_of(gpu: FakeGpu, pointer: int) -> int:
    return int(gpu.state.device_allocs[pointer].device)


def test_greedy_tokens_equal_onnxruntime_stages_and_hf(
    two_gpus: FakeGpu, llama: dict, ort_generator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trtpipe.generation import Generator, SamplingParams
    from trtpipe.generation.prompts import tokenize
    from trtpipe.generation.staged_session import StagedDecoderSession
    from trtpipe.generation.tensorrt_stage import StageKV, TensorRTDecoderStage

    rows = tokenize(ort_generator.tokenizer, PROMPTS)
    assert len({len(r) for r in rows}) == len(rows)  # really different lengths: left padding
    params = SamplingParams(MAX_NEW, greedy=True, ignore_eos=True)
    expected = [r.token_ids for r in ort_generator.generate(PROMPTS, params)]
    assert expected == hf_greedy(llama["model"], rows, MAX_NEW)
    gpu = two_gpus
    with Generator(llama["trt"], GPUS) as generator:
        session, twin = generator.sessions
        assert isinstance(session, StagedDecoderSession) and isinstance(twin, StagedDecoderSession)
        assert all(isinstance(s, TensorRTDecoderStage) for s in session.stages)
        assert twin.stages is session.stages
        copies = record_copies(gpu, monkeypatch)
        results = generator.generate(PROMPTS, params)
        assert [r.token_ids for r in results] == expected
        assert {r.device for r in results} == {"cuda:0,cuda:1"}

        # Boundary and logits traffic of that one batch (4 rows, prompt S, 12 steps): device 0
        # sends only the hidden state down (the whole prompt once, then one position a step);
        # only device 1 sends logits, the last position of each row.
        batch, width = len(PROMPTS), max(len(r) for r in rows)
        hidden, vocab = 32 * 4, 320 * 4
        down = {d: sum(n for kind, dev, n in copies if kind == "dtoh" and dev == d) for d in (0, 1)}
        assert down[0] == batch * hidden * (width + MAX_NEW - 1)
        assert down[1] == batch * vocab * MAX_NEW
        assert {dev for kind, dev, _ in copies if kind == "htod"} == {0, 1}

        # Every buffer of a stage, its engine's and each session's KV, is on its own device,
        # and the fake's per-device accounting holds exactly those (plus nothing else).
        held = {0: 0, 1: 0}
        for index, stage in enumerate(session.stages):
            assert stage.device == GPUS[index]
            buffers = list(stage.runner._device_buffers.values())
            kvs = [s.past[index] for s in (session, twin)]
            assert all(isinstance(kv, StageKV) for kv in kvs)
            assert {c.past for c in stage.cache} == {
                f"past_key_values.{index}.key",
                f"past_key_values.{index}.value",
            }
            for buffer in [*buffers, *(b for kv in kvs for b in kv.buffers)]:
                assert device_of(gpu, buffer.ptr) == index
                held[index] += buffer.nbytes
            # Two tensors (key, value), each a past/present pair of
            # [max_batch, 2 heads, max_total - 1 = MAX_PAST, head_dim 8] fp32.
            pair = 2 * MAX_BATCH * 2 * MAX_PAST * 8 * 4
            assert sum(b.nbytes for b in kvs[0].buffers) == 2 * pair
        assert {d: gpu.state.device_bytes[d] for d in (0, 1)} == held
        # The session's cache as the scheduler reads it: each stage's own layers, grown to
        # prompt + new - 1 positions.
        cache = session.read_cache()
        assert [a.shape for a in cache] == [(batch, 2, width + MAX_NEW - 1, 8)] * 4

        # Two chunks of two rows run at once on the twins, each with its own device cache.
        steps = [s.steps for s in session.stages]
        halves = generator.generate(PROMPTS, params, batch_size=2)
        assert [r.token_ids for r in halves] == expected
        assert [s.steps - n for s, n in zip(session.stages, steps, strict=True)] == [
            2 * MAX_NEW
        ] * 2
    assert gpu.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_scheduler_rows_join_and_leave(two_gpus: FakeGpu, llama: dict, ort_generator: Any) -> None:
    """Rows joining and leaving regroup each stage's device cache (read_cache / write_cache
    through pinned staging on its own GPU); every request keeps its tokens alone and HF's."""
    from tests.integration.test_scheduler_engine import SlowSession, check_rows_join_and_leave
    from trtpipe.generation.scheduler import Scheduler, SchedulerConfig
    from trtpipe.generation.sessions import decoder_session

    session = decoder_session(llama["trt"], GPUS)
    session.load()
    scheduler = Scheduler(SlowSession(session, 0.002), ort_generator.pad_id, SchedulerConfig())  # type: ignore[arg-type]
    scheduler.start()
    try:
        check_rows_join_and_leave(
            {"generator": ort_generator, "model": llama["model"], "engine": llama["ort"]},
            scheduler,
        )
    finally:
        scheduler.stop()
        session.close()
    assert two_gpus.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_generate_cli_on_two_fake_gpus(
    two_gpus: FakeGpu, llama: dict, ort_generator: Any, tmp_path: Path
) -> None:
    import json

    from trtpipe.generation.prompts import tokenize

    out = tmp_path / "run.json"
    result = CliRunner().invoke(
        cli,
        [
            "generate", str(llama["trt"].path), "--devices", "cuda:0,cuda:1", "--greedy",
            "--max-new-tokens", "8", "--json", str(out),
            *[arg for prompt in PROMPTS[:2] for arg in ("--prompt", prompt)],
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = tokenize(ort_generator.tokenizer, PROMPTS[:2])
    assert [r["token_ids"] for r in data["results"]] == hf_greedy(llama["model"], rows, 8)
    assert all(r["device"] == "cuda:0,cuda:1" for r in data["results"])
    assert two_gpus.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_kv_room_and_cache_shapes_refused_with_a_message(two_gpus: FakeGpu, llama: dict) -> None:
    """A step past the engine's KV room or a cache of the wrong shape is one InputError that
    says why, before any device work; the session still steps and closes cleanly after."""
    from trtpipe.errors import InputError
    from trtpipe.generation.sessions import decoder_session

    session = decoder_session(llama["trt"], GPUS)
    session.load()
    try:
        heads, head_dim = 2, 8
        full = [np.zeros((1, heads, MAX_PAST - 4, head_dim), np.float32) for _ in range(4)]
        session.write_cache(full)
        ids = np.ones((1, 8), np.int64)
        mask = np.ones((1, MAX_PAST + 4), np.int64)
        positions = np.arange(MAX_PAST - 4, MAX_PAST + 4, dtype=np.int64)[None]
        with pytest.raises(InputError, match="exceed the engine's KV room of 64 positions"):
            session.step(ids, mask, positions)
        # Layer 0 fine alone (length 10), layer 1 with 3 heads: refused before stage 0's cache
        # is touched.
        short = np.zeros((1, heads, 10, head_dim), np.float32)
        wrong = [short, short, short, np.zeros((1, 3, 10, head_dim), np.float32)]
        with pytest.raises(InputError, match="has shape"):
            session.write_cache(wrong)
        assert [a.shape[2] for a in session.read_cache()] == [MAX_PAST - 4] * 4
        session.start(1)
        logits = session.step(ids, mask[:, :8], positions[:, :8] - (MAX_PAST - 4))
        assert logits.shape == (1, 320) and np.isfinite(logits).all()
    finally:
        session.close()
    assert two_gpus.leaks() == {"device": 0, "host": 0, "streams": 0}
