"""Pipeline stages for KV-cache decoders: tiny Llama and GPT-2 cut in 2, one CPU worker a stage.

Each stage must hold only its own layers' cache and weights, and generation over the staged
session must give exactly HF's greedy tokens (batched, left-padded), through ``Generator``, the
continuous-batching scheduler, the decoder gate and the ``generate`` CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.decoders import save_tiny_gpt2, save_tiny_llama
from tests.integration.test_generation import PROMPTS, hf_greedy, padded
from trtpipe.cli.main import cli
from trtpipe.devices import Device
from trtpipe.engine import EngineDir

MAX_NEW = 24
MAX_BATCH, MAX_PROMPT, MAX_PAST = 16, 32, 64
SAVERS = {"llama": save_tiny_llama, "gpt2": save_tiny_gpt2}
CPU2 = [Device("cpu", 0), Device("cpu", 1)]


def build_staged(onnx_path: Path, out: Path, *flags: str, stages: int = 2) -> EngineDir:
    """``trtpipe build --pipeline-stages N`` with a small profile."""
    import onnx

    from trtpipe.build.profile import onnx_io_specs

    inputs, _ = onnx_io_specs(onnx.load(str(onnx_path), load_external_data=False))
    past = next(s for s in inputs if s.name == "past_key_values.0.key")
    heads, head_dim = past.shape[1], past.shape[3]
    result = CliRunner().invoke(
        cli,
        [
            "build", str(onnx_path), "--backend", "onnxruntime", *flags,
            "--pipeline-stages", str(stages), "--opt-shapes", "input_ids:4x16",
            "--max-shapes",
            f"input_ids:{MAX_BATCH}x{MAX_PROMPT},{past.name}:{MAX_BATCH}x{heads}x{MAX_PAST}x{head_dim}",
            "-o", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return EngineDir(out)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def staged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from trtpipe.export import export_model

    name = request.param
    root = tmp_path_factory.mktemp(f"pp-{name}")
    model_dir = SAVERS[name](root / "model")
    onnx_path = export_model(str(model_dir), root / "onnx", task="text-generation-with-past")
    return {
        "name": name,
        "model": model_dir,
        "onnx": onnx_path,
        "engine": build_staged(onnx_path, root / "pp2"),
    }


@pytest.fixture(scope="module")
def generator(staged: dict) -> Iterator:
    from trtpipe.generation import Generator

    with Generator(staged["engine"], CPU2) as gen:
        yield gen


def test_stages_hold_only_their_own_layers_kv(staged: dict) -> None:
    engine: EngineDir = staged["engine"]
    first, second = engine.stage_dirs()
    names = lambda specs: [s.name for s in specs]  # noqa: E731
    assert [s["layers"] for s in engine.manifest.stages] == [[0, 0], [1, 1]]
    cache0 = [n for n in names(first.manifest.inputs) if n.startswith("past_key_values")]
    cache1 = [n for n in names(second.manifest.inputs) if n.startswith("past_key_values")]
    assert sorted(cache0) == ["past_key_values.0.key", "past_key_values.0.value"]
    assert sorted(cache1) == ["past_key_values.1.key", "past_key_values.1.value"]
    out0, out1 = names(first.manifest.outputs), names(second.manifest.outputs)
    assert sorted(n for n in out0 if n.startswith("present")) == [
        "present.0.key",
        "present.0.value",
    ]
    assert sorted(out1) == ["logits", "present.1.key", "present.1.value"]
    # Stage 0 takes the tokens; stage 1 the boundary hidden state plus the shared mask (not the
    # tokens, so not the embedding table either).
    boundary = [n for n in out0 if not n.startswith("present")]
    assert len(boundary) == 1
    hidden = second.manifest.input(boundary[0])
    assert hidden.dtype == "float32" and hidden.shape == [-1, -1, 32]
    assert second.manifest.profile[hidden.name].max == [MAX_BATCH, MAX_PROMPT, 32]
    assert "input_ids" in names(first.manifest.inputs)
    assert "input_ids" not in names(second.manifest.inputs)
    assert "attention_mask" in names(first.manifest.inputs)
    assert "attention_mask" in names(second.manifest.inputs)
    # The chain reads like the unsplit export: every past in, logits and every present out.
    assert sorted(names(engine.manifest.outputs)) == sorted(
        ["logits"] + [f"present.{i}.{k}" for i in (0, 1) for k in ("key", "value")]
    )
    assert {n for n in names(engine.manifest.inputs) if n.startswith("past")} == set(
        cache0 + cache1
    )


def stage_weights(stage: EngineDir) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(stage.engine_path))
    return {w.name: numpy_helper.to_array(w) for w in model.graph.initializer}


def holds(weights: dict[str, np.ndarray], table: np.ndarray) -> bool:
    return any(
        w.shape in (table.shape, table.T.shape)
        and np.array_equal(w if w.shape == table.shape else w.T, table)
        for w in weights.values()
    )


def test_embedding_and_head_weights_per_stage(staged: dict) -> None:
    """GPT-2's tied embedding/LM head is on both stages (and in both byte counts); Llama's
    untied embedding only on stage 0, its head only on stage 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(staged["model"]))
    embedding = model.get_input_embeddings().weight.detach().numpy()
    head = model.get_output_embeddings().weight.detach().numpy()
    engine: EngineDir = staged["engine"]
    first, second = (stage_weights(s) for s in engine.stage_dirs())
    table_bytes = embedding.size * 4
    stage_bytes = [s["weight_bytes"] for s in engine.manifest.stages]
    assert all(size > table_bytes for size in stage_bytes)
    if staged["name"] == "gpt2":
        assert np.array_equal(embedding, head)  # tied
        assert holds(first, embedding) and holds(second, embedding)
    else:
        assert not np.array_equal(embedding, head)
        assert holds(first, embedding) and not holds(second, embedding)
        assert holds(second, head) and not holds(first, head)


def test_greedy_equals_hf_batched_left_padded(staged: dict, generator) -> None:
    from trtpipe.generation import SamplingParams
    from trtpipe.generation.prompts import tokenize
    from trtpipe.generation.staged_session import StagedDecoderSession

    rows = tokenize(generator.tokenizer, PROMPTS)
    assert len({len(r) for r in rows}) == len(rows)  # really different lengths: left padding
    expected = hf_greedy(staged["model"], rows, MAX_NEW)
    results = generator.generate(PROMPTS, SamplingParams(MAX_NEW, greedy=True))
    assert [r.token_ids for r in results] == expected
    assert {r.device for r in results} == {"cpu:0,cpu:1"}
    # One replica, two sessions (twins) over the same loaded stages, each with its own cache.
    session, twin = generator.sessions
    assert isinstance(session, StagedDecoderSession) and isinstance(twin, StagedDecoderSession)
    assert twin.stages is session.stages and twin.past is not session.past
    # Each stage's cache is its own, on its own device, grown to prompt + new - 1 positions.
    first, second = session.past
    assert sorted(first) == ["past_key_values.0.key", "past_key_values.0.value"]
    assert sorted(second) == ["past_key_values.1.key", "past_key_values.1.value"]
    width = max(len(r) for r in rows) + MAX_NEW - 1
    assert first["past_key_values.0.key"].shape()[2] == width
    assert type(second["past_key_values.1.key"]).__name__ == "OrtValue"
    assert [s.device for s in session.stages] == CPU2
    # Two chunks of two prompts run at once on the twins (their steps overlap across the
    # stages): the same tokens.
    steps = [s.steps for s in session.stages]
    halves = generator.generate(PROMPTS, SamplingParams(MAX_NEW, greedy=True), batch_size=2)
    assert [r.token_ids for r in halves] == expected
    assert all(s.steps - n >= 2 * MAX_NEW for s, n in zip(session.stages, steps, strict=True))


def test_scheduler_over_the_staged_session_joins_and_leaves(staged: dict, generator) -> None:
    """Rows joining and leaving mid-run regroup the cache across both stages (read_cache /
    write_cache) and each still gets its tokens alone, and HF's."""
    from tests.integration.test_scheduler_engine import (
        SlowSession,
        check_rows_join_and_leave,
    )
    from trtpipe.generation.scheduler import Scheduler, SchedulerConfig
    from trtpipe.generation.sessions import decoder_session

    session = decoder_session(staged["engine"], CPU2)
    session.load()
    scheduler = Scheduler(SlowSession(session, 0.002), generator.pad_id, SchedulerConfig())  # type: ignore[arg-type]
    scheduler.start()
    try:
        check_rows_join_and_leave(
            {"generator": generator, "model": staged["model"], "engine": staged["engine"]},
            scheduler,
        )
    finally:
        scheduler.stop()
        session.close()


def test_decoder_gate_passes_on_the_staged_engine(staged: dict) -> None:
    from trtpipe.compare_decoder import compare_decoder_engine

    report = compare_decoder_engine(staged["engine"], new_tokens=8, device=Device("cpu", 0))
    assert report.passed, report.table()
    assert report.outputs["logits"].top1_agreement == 1.0
    assert report.outputs["logits"].max_abs < 1e-4
    assert report.greedy.match_rate == 1.0 and report.greedy.exact == report.samples


def test_generate_cli_on_two_cpu_workers(staged: dict, tmp_path: Path) -> None:
    from trtpipe.generation.prompts import tokenize
    from trtpipe.text import load_tokenizer

    out = tmp_path / "run.json"
    command = [
        sys.executable, "-m", "trtpipe.cli.main", "generate", str(staged["engine"].path),
        "--devices", "cpu:0,cpu:1", "--greedy", "--max-new-tokens", "12", "--json", str(out),
        *[arg for prompt in PROMPTS[:2] for arg in ("--prompt", prompt)],
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["devices"] == ["cpu:0", "cpu:1"]
    rows = tokenize(load_tokenizer(str(staged["engine"].path)), PROMPTS[:2])
    assert [r["token_ids"] for r in data["results"]] == hf_greedy(staged["model"], rows, 12)
    assert all(r["device"] == "cpu:0,cpu:1" for r in data["results"])
    # Three workers do not make pipeline replicas of two stages: one clear line.
    command[command.index("cpu:0,cpu:1")] = "cpu:0,cpu:1,cpu:2"
    bad = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "do not divide into pipeline replicas of 2 stages" in bad.stderr


def test_two_schedulers_on_twin_sessions_keep_each_requests_tokens(staged: dict, generator) -> None:
    """As ``serve`` runs a staged decoder: one scheduler per twin session, both stepping
    through the same stages at once; every request still gets its tokens alone."""
    from tests.integration.test_scheduler_engine import request, tokens
    from trtpipe.generation import SamplingParams
    from trtpipe.generation.scheduler import Scheduler, SchedulerConfig
    from trtpipe.generation.sessions import decoder_session

    plans = [(PROMPTS[i % len(PROMPTS)], 6 + 3 * i) for i in range(6)]
    llama = {"generator": generator}
    expected = [
        generator.generate([p], SamplingParams(n, greedy=True))[0].token_ids for p, n in plans
    ]
    session = decoder_session(staged["engine"], CPU2)
    session.load()
    schedulers = [
        Scheduler(s, generator.pad_id, SchedulerConfig())
        for s in (session, session.twin())  # type: ignore[attr-defined]
    ]
    try:
        for scheduler in schedulers:
            scheduler.start()
        seqs = [request(llama, p, SamplingParams(n, greedy=True)) for p, n in plans]
        for i, seq in enumerate(seqs):
            schedulers[i % 2].submit(seq)
        assert [tokens(seq) for seq in seqs] == expected
        assert all(s.stats.finished == 3 for s in schedulers)
    finally:
        for scheduler in schedulers:
            scheduler.stop()
        session.close()


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_stages_pass_their_decoder_gate(
    staged: dict, precision: str, tmp_path: Path
) -> None:
    """fp16 (AutoCast) and int8 (ONNX Runtime dynamic int8) per stage, each stage calibrated on
    the fp32 boundary activations of the stages before it, through the same staged session:
    the fp16 gate passes, int8 stays close to HF."""
    from trtpipe.compare_decoder import compare_decoder_engine

    if precision == "int8" and staged["name"] == "gpt2":
        # The random tiny GPT-2 fails the int8 gate unsplit as well (top-1 96.7% < 98% on an
        # AVX2 CPU): a property of int8 on this model, not of the stages.
        pytest.skip("int8 gate fails for the unsplit random tiny GPT-2 too")

    engine = build_staged(staged["onnx"], tmp_path / f"pp2-{precision}", f"--{precision}")
    assert engine.manifest.precision == precision
    for stage in engine.stage_dirs():
        assert stage.manifest.precision == precision
        counts = json.loads((stage.path / "build_log.json").read_text())["op_counts"]
        if precision == "fp16":  # most float work of every stage is fp16
            by_dtype = counts["by_output_dtype"]
            assert by_dtype["float16"] > 5 * by_dtype.get("float32", 0)
    report = compare_decoder_engine(engine, new_tokens=8, device=Device("cpu", 0))
    logits = report.outputs["logits"]
    if precision == "fp16":
        assert report.passed, report.table()
        assert logits.top1_agreement >= 0.95
    else:
        # int8 accuracy depends on the CPU's int8 kernels (docs/runtime.md): the gate passed
        # here (AVX2: cosine 0.9999, top-1 98.6% vs the 98% floor); assert wide of that.
        assert logits.cosine_min > 0.999 and logits.top1_agreement >= 0.9, report.table()


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-layer tiny Llama cut into 3 stages (the middle one takes and gives a hidden state)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.decoders import save_tokenizer
    from trtpipe.export import export_model

    root = tmp_path_factory.mktemp("pp3-llama")
    model_dir = root / "model"
    save_tokenizer(model_dir)
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(model_dir)
    onnx_path = export_model(str(model_dir), root / "onnx", task="text-generation-with-past")
    engine = build_staged(onnx_path, root / "pp3", "--stage-layers", "0-0,1-1,2-2", stages=3)
    return {"model": model_dir, "engine": engine}


def test_three_stages_on_three_workers_equal_hf(llama3: dict) -> None:
    from trtpipe.generation import Generator, SamplingParams
    from trtpipe.generation.prompts import tokenize

    engine: EngineDir = llama3["engine"]
    assert [s["layers"] for s in engine.manifest.stages] == [[0, 0], [1, 1], [2, 2]]
    for i, stage in enumerate(engine.stage_dirs()):
        caches = {s.name for s in stage.manifest.inputs if s.name.startswith("past")}
        assert caches == {f"past_key_values.{i}.key", f"past_key_values.{i}.value"}
        hidden = [s.name for s in stage.manifest.inputs if s.name.startswith("/")]
        assert len(hidden) == (0 if i == 0 else 1)
        assert ("logits" in {o.name for o in stage.manifest.outputs}) == (i == 2)
    with Generator(engine, [Device("cpu", i) for i in range(3)]) as generator:
        rows = tokenize(generator.tokenizer, PROMPTS)
        results = generator.generate(PROMPTS, SamplingParams(16, greedy=True))
    # A row that meets EOS stops; HF pads it (with the pad id 0) to the batch's length.
    assert padded(results, 16) == hf_greedy(llama3["model"], rows, 16)
    assert any(r.finish_reason == "stop" for r in results)
    assert {r.device for r in results} == {"cpu:0,cpu:1,cpu:2"}


def test_serve_runs_the_staged_decoder_with_continuous_batching(staged: dict, generator) -> None:
    """``trtpipe serve`` of a staged decoder on cpu:0,cpu:1: one pipeline replica, two
    interleaved schedulers; concurrent OpenAI completions each get the offline greedy text."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.server_utils import start_server
    from trtpipe.generation import SamplingParams

    expected = [r.text for r in generator.generate(PROMPTS, SamplingParams(MAX_NEW, greedy=True))]
    thread = start_server([str(staged["engine"].path)], devices=2, grpc=False)
    try:
        url = f"http://127.0.0.1:{thread.server.http_port}"
        name = staged["engine"].path.name

        def complete(prompt: str) -> str:
            body = {"model": name, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0}
            reply = httpx.post(url + "/v1/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            return str(reply.json()["choices"][0]["text"])

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(complete, PROMPTS)) == expected
        ready = httpx.get(f"{url}/v2/models/{name}/ready", timeout=10)
        assert ready.status_code == 200
    finally:
        thread.stop()
