"""``trtpipe bench`` end to end on the tiny BERT engine (max batch 8, max seq 64)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from trtpipe.cli.main import cli

TEXTS = [
    "A cat.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Hello there.",
    "Benchmarks should be measured the way users would measure them, against what they run.",
    "Short one.",
    "Padding to the longest text of a batch wastes compute when lengths differ a lot, so "
    "sorting by length first keeps every batch nearly free of padding tokens.",
    "Yes.",
    "Numbers without a machine and a date mean little.",
]


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "texts.txt"
    path.write_text("\n".join(TEXTS * 5) + "\n")
    return path


def test_fixed_shapes_json_and_plot(tiny_bert_engine: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    result = run_cli(
        str(tiny_bert_engine),
        "--batch-sizes", "1,8",
        "--seq-lens", "16",
        "--runs", "3",
        "--warmup", "1",
        "--json", str(out),
        "--plot", str(png),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "speedup" in result.output and "fixed shapes" in result.output
    report = json.loads(out.read_text())
    rows = report["fixed"]
    assert [(r["batch_size"], r["seq_len"]) for r in rows] == [(1, 16), (8, 16)]
    for row in rows:
        engine, base = row["engine"], row["baseline"]
        assert engine["latency_ms"]["n"] == 3 and base["latency_ms"]["n"] == 3
        assert 0 < engine["latency_ms"]["p50_ms"] <= engine["latency_ms"]["p99_ms"]
        assert engine["tokens_per_s"] == pytest.approx(16 * engine["sequences_per_s"])
        assert row["speedup"] == pytest.approx(engine["sequences_per_s"] / base["sequences_per_s"])
        assert row["speedup"] > 0
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["date"]
    assert "torch" in machine["versions"] and "onnxruntime-gpu" in machine["versions"]
    assert report["gate"]["status"] == "unchecked"
    assert report["settings"]["threads"] >= 1
    assert report["engine"]["max_batch_size"] == 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_text_processes_every_text_once_in_order(tiny_bert_engine: Path) -> None:
    from trtpipe.bench.text import recipe_pass, sorted_pass
    from trtpipe.devices import Device
    from trtpipe.engine import EngineDir
    from trtpipe.runners import runner_for
    from trtpipe.text import load_tokenizer

    engine = EngineDir(tiny_bert_engine)
    tokenizer = load_tokenizer(str(tiny_bert_engine))
    texts = TEXTS * 3 + [f"Sentence number {i} has {'many ' * i}words." for i in range(13)]
    inputs = engine.manifest.inputs
    with runner_for(engine, Device("cpu")) as runner:
        ours = sorted_pass(
            runner.infer, tokenizer, texts, inputs, 64, 8, keep_rows="last_hidden_state"
        )
        recipe = recipe_pass(
            runner.infer, tokenizer, texts, inputs, 64, batch_size=8, keep_rows="last_hidden_state"
        )
        alone = np.stack(
            [
                runner.infer(
                    {k: v.astype(np.int64) for k, v in tokenizer([t], return_tensors="np").items()}
                )["last_hidden_state"][0, 0]
                for t in texts
            ]
        )
    assert ours.counts.tolist() == [1] * len(texts)
    assert recipe.counts.tolist() == [1] * len(texts)
    assert ours.batches >= -(-len(texts) // 8)
    assert recipe.batches == -(-len(texts) // 8)
    # Outputs went back to each text's own position (sorting must not scramble them).
    np.testing.assert_allclose(ours.first_rows, alone, atol=1e-4)
    np.testing.assert_allclose(recipe.first_rows, alone, atol=1e-4)
    # Sorting wastes far less of the launch on padding than the original order.
    assert ours.real_tokens == recipe.real_tokens
    assert ours.padding_ratio < recipe.padding_ratio


def test_real_text_cli(tiny_bert_engine: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "text.json"
    result = run_cli(
        str(tiny_bert_engine), "--texts", str(corpus), "--text-runs", "1",
        "--sorted-baseline", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = json.loads(out.read_text())["text"]
    assert "fixed" not in json.loads(out.read_text())
    assert text["texts"] == len(TEXTS) * 5
    assert text["engine"]["texts_processed_once"] and text["baseline"]["texts_processed_once"]
    assert text["engine"]["sentences_per_s"] > 0 and text["speedup"] > 0
    assert text["baseline"]["batches"] == -(-len(TEXTS) * 5 // 16)
    assert text["engine"]["real_tokens"] == text["baseline"]["real_tokens"]
    assert text["other_baselines"]["torch_sorted"]["engine_speedup"] > 0


def test_scaling_table(tiny_bert_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    result = run_cli(
        str(tiny_bert_engine), "--devices", "cpu:2", "--batch-sizes", "4", "--seq-lens", "16",
        "--scaling-batches", "4", "--runs", "2", "--baseline", "none", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "efficiency" in result.output
    report = json.loads(out.read_text())
    assert "fixed" not in report  # the shapes define the scaling workload only
    scaling = report["scaling"]
    rows = scaling["rows"]
    assert [r["count"] for r in rows] == [1, 2]
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["speedup"] / 2)
    assert all(r["sequences_per_s"] > 0 and len(r["seconds_runs"]) == 2 for r in rows)


def test_gate_report_is_read(tiny_bert_engine: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"passed": True, "precision": "fp32", "outputs": {}}))
    out = tmp_path / "out.json"
    result = run_cli(
        str(tiny_bert_engine), "--batch-sizes", "2", "--seq-lens", "8", "--runs", "1",
        "--baseline", "none", "--gate-report", str(gate), "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "accuracy gate: passed" in result.output
    report = json.loads(out.read_text())
    assert report["gate"]["status"] == "passed"
    assert report["fixed"][0]["baseline"] is None and report["fixed"][0]["speedup"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "1,x"], "bad --batch-sizes"),
        (["--batch-sizes", "64"], "maximum batch 8"),
        (["--seq-lens", "100"], "outside the engine's profile"),
        (["--runs", "0"], "Invalid value for '--runs': 0 is not in the range x>=1"),
        (["--warmup", "-1"], "Invalid value for '--warmup'"),
        (["--threads", "0"], "Invalid value for '--threads'"),
        (["--generate", "--threads", "0"], "Invalid value for '--threads'"),
        (["--texts", "/nonexistent/texts.txt"], "does not exist"),
        (["--gpus", "0,0"], "names a GPU twice"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    tiny_bert_engine: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "never.json"
    result = CliRunner().invoke(cli, ["bench", str(tiny_bert_engine), *args, "--json", str(out)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_missing_engine_dir_and_missing_mode(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not an engine directory" in result.output
    result = CliRunner().invoke(cli, ["bench"])
    assert result.exit_code == 2 and "--url" in result.output


def test_online_sweep_against_a_real_server(tiny_bert_engine: Path, tmp_path: Path) -> None:
    from tests.server_utils import start_server

    server = start_server([f"tiny={tiny_bert_engine}"], devices=1, grpc=False)
    try:
        out = tmp_path / "online.json"
        result = run_cli(
            "--url", f"127.0.0.1:{server.server.http_port}", "--model", "tiny",
            "--concurrency", "1,8", "--requests", "40", "--duration", "10", "--seq-len", "16",
            "--engine-dir", str(tiny_bert_engine), "--runs", "3", "--json", str(out),
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        online = json.loads(out.read_text())["online"]
        levels = online["levels"]
        assert [lv["concurrency"] for lv in levels] == [1, 8]
        for level in levels:
            assert level["requests"] == 40 and level["errors"] == 0
            assert level["requests_per_s"] > 0
            assert level["server"]["requests"] == 40
            assert level["server"]["queue_ms"] is not None and level["server"]["compute_ms"] > 0
            assert level["offline_fraction"] > 0
        assert levels[0]["server"]["average_batch_size"] == pytest.approx(1.0)
        assert online["offline"]["batch_size"] == 8 and online["offline"]["direct_p50_ms"] > 0
        assert online["overhead_p50_ms"] == pytest.approx(
            levels[0]["latency_ms"]["p50_ms"] - online["offline"]["direct_p50_ms"]
        )
        url = f"127.0.0.1:{server.server.http_port}"
        wrong = CliRunner().invoke(cli, ["bench", "--url", url, "--model", "nope"])
        assert wrong.exit_code == 2 and "Traceback" not in wrong.output
        assert f"error: model 'nope' is not served by {url}: " in wrong.output
        assert "['tiny']" in wrong.output  # the server's list of what it serves
        # Past the model's 64 positions: the server's 400, said once (was a 53-line traceback).
        too_long = CliRunner().invoke(
            cli,
            ["bench", "--url", url, "--model", "tiny", "--seq-len", "500", "--concurrency", "1",
             "--json", str(tmp_path / "never.json")],
        )  # fmt: skip
        assert too_long.exit_code == 2 and "Traceback" not in too_long.output
        lines = too_long.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: {url} refused a request of 500 tokens for model 'tiny': "
        )
        assert "1..64" in lines[0] and lines[0].endswith("; lower --seq-len")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["online.json"]  # nothing new
    finally:
        server.stop()


def test_online_without_a_server_is_a_clear_error() -> None:
    result = CliRunner().invoke(
        cli, ["bench", "--url", "127.0.0.1:9", "--model", "m", "--concurrency", "1"]
    )
    assert result.exit_code == 2
    assert "cannot reach a server" in result.output


def test_served_text_without_a_server_or_model_is_a_clear_error(
    tiny_bert_engine: Path, corpus: Path
) -> None:
    """Checked before the offline figures are taken (a minute on a real corpus)."""
    args = ["--engine-dir", str(tiny_bert_engine), "--texts", str(corpus), "--concurrency", "1"]
    result = CliRunner().invoke(cli, ["bench", "--url", "127.0.0.1:9", "--model", "m", *args])
    assert result.exit_code == 2
    assert "cannot reach a server at 127.0.0.1:9" in result.output
    assert "Traceback" not in result.output
    from tests.server_utils import start_server

    server = start_server([f"tiny={tiny_bert_engine}"], devices=1, grpc=False)
    try:
        url = f"127.0.0.1:{server.server.http_port}"
        result = CliRunner().invoke(cli, ["bench", "--url", url, "--model", "nope", *args])
    finally:
        server.stop()
    assert result.exit_code == 2
    assert f"model 'nope' is not served by {url}" in result.output


def test_generation_mode_against_hf_generate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.decoders import save_tiny_llama
    from trtpipe.build import BuildConfig, build_engine_dir
    from trtpipe.export import export_model

    onnx_path = export_model(
        str(save_tiny_llama(tmp_path / "model")),
        tmp_path / "onnx",
        task="text-generation-with-past",
    )
    engine = tmp_path / "engine"
    build_engine_dir(BuildConfig(onnx_path=onnx_path, output=engine, backend="onnxruntime"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The King is dead.\nOnce upon a time\nNumbers like 1, 2, 3\n")
    out, png = tmp_path / "gen.json", tmp_path / "gen.png"
    result = run_cli(
        str(engine), "--generate", "--prompts-file", str(prompts), "--max-new-tokens", "4",
        "--batch-sizes", "1,2", "--runs", "1", "--warmup", "0", "--json", str(out),
        "--plot", str(png),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["generation"]["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for row in rows:
        assert row["engine"]["generated_tokens"] == 3 * 4
        assert row["baseline"]["generated_tokens"] == 3 * 4
        assert row["engine_tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
        assert row["speedup"] == pytest.approx(
            row["engine_tokens_per_s"] / row["baseline_tokens_per_s"]
        )
        assert row["engine"]["ttft_ms_p50"] > 0
        # An fp32 engine's greedy tokens are HF's, batched or not: the speedup is like for like.
        assert row["tokens_match_hf"] is True
        assert row["token_agreement"] == {"match": True, "fraction": 1.0, "first_mismatch": None}
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "tokens = HF" in result.output and "yes" in result.output

    # --baseline none: the engine alone; HF generate must not even be loaded.
    import trtpipe.generation.bench as generation_bench

    def no_hf(*args: object, **kwargs: object) -> None:
        raise AssertionError("--baseline none ran the HF baseline")

    monkeypatch.setattr(generation_bench, "hf_generate_baseline", no_hf)
    alone = tmp_path / "alone.json"
    result = run_cli(
        str(engine), "--generate", "--prompts-file", str(prompts), "--max-new-tokens", "4",
        "--baseline", "none", "--runs", "1", "--warmup", "0", "--json", str(alone),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(alone.read_text())
    (row,) = report["generation"]["rows"]
    assert row["engine"]["generated_tokens"] == 3 * 4 and row["engine_tokens_per_s"] > 0
    assert row["baseline"] is None and row["speedup"] is None and row["tokens_match_hf"] is None
    assert report["settings"]["baseline"] is None


def test_token_agreement_figures() -> None:
    from trtpipe.generation.bench import token_agreement

    same = token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]])
    assert same == {"match": True, "fraction": 1.0, "first_mismatch": None}
    parted = token_agreement([[1, 2, 3], [4, 9, 6, 7]], [[1, 2, 3], [4, 5, 6, 7]])
    assert parted == {
        "match": False,
        "fraction": 6 / 7,
        "first_mismatch": {"prompt": 1, "token": 1},
    }
    short = token_agreement([[1, 2]], [[1, 2, 3]])
    assert short == {"match": False, "fraction": 2 / 3, "first_mismatch": {"prompt": 0, "token": 2}}
    with pytest.raises(ValueError, match="1 engine rows vs 2 reference rows"):
        token_agreement([[1]], [[1], [2]])


def test_generation_mode_needs_a_decoder(tiny_bert_engine: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", str(tiny_bert_engine), "--generate"])
    assert result.exit_code == 2
    assert "needs a text-generation engine" in result.output
