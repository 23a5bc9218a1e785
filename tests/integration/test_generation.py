"""Generation with KV-cache decoder engines vs HF ``generate`` on tiny random Llama and GPT-2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.decoders import save_tiny_gpt2, save_tiny_llama
from trtpipe.errors import InputError

PROMPTS = [
    "The King is dead.",
    "A quick brown fox jumps over the lazy dog.",
    "Once",
    "Numbers like 42",
]
MAX_NEW = 24
# Small profile so limit checks are cheap to hit: prompt <= 32 tokens, past <= 64.
MAX_PROMPT, MAX_PAST = 32, 64
SAVERS = {"llama": save_tiny_llama, "gpt2": save_tiny_gpt2}


def build(onnx_path: Path, out: Path, precision: str, backend: str = "onnxruntime") -> Path:
    import onnx

    from trtpipe.build import BuildConfig, build_engine_dir
    from trtpipe.build.profile import onnx_io_specs
    from trtpipe.devices import Device

    inputs, _ = onnx_io_specs(onnx.load(str(onnx_path), load_external_data=False))
    past = next(s for s in inputs if s.name == "past_key_values.0.key")
    build_engine_dir(
        BuildConfig(
            onnx_path=onnx_path,
            output=out,
            precision=precision,
            backend=backend,
            device=Device("cuda", 0) if backend == "tensorrt" else Device("cpu"),
            opt_shapes={"input_ids": [4, 16]},
            max_shapes={
                "input_ids": [8, MAX_PROMPT],
                past.name: [8, past.shape[1], MAX_PAST, past.shape[3]],
            },
        )
    )
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def decoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from trtpipe.export import export_model

    name = request.param
    root = tmp_path_factory.mktemp(f"tiny-{name}")
    model_dir = SAVERS[name](root / "model")
    onnx_path = export_model(str(model_dir), root / "onnx", task="text-generation-with-past")
    return {
        "name": name,
        "model": model_dir,
        "onnx": onnx_path,
        "fp32": build(onnx_path, root / "engine-fp32", "fp32"),
    }


def hf_greedy(model_dir: Path, rows: list[list[int]], max_new: int, **kwargs: object) -> list:
    """HF generate on the same left-padded ids and attention mask; new tokens per row."""
    import torch
    from transformers import AutoModelForCausalLM

    from trtpipe.generation.prompts import left_pad

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids, mask = left_pad(rows, 0)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=0,
            **kwargs,
        )
    return out[:, ids.shape[1] :].tolist()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "trtpipe.cli.main", "generate", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def padded(results: list, width: int, pad: int = 0) -> list[list[int]]:
    return [r.token_ids + [pad] * (width - len(r.token_ids)) for r in results]


def test_greedy_equals_hf_generate_batched_left_padded(decoder: dict) -> None:
    from trtpipe.generation import Generator, SamplingParams
    from trtpipe.generation.prompts import tokenize

    with Generator(decoder["fp32"]) as generator:
        rows = tokenize(generator.tokenizer, PROMPTS)
        assert len({len(r) for r in rows}) == len(rows)  # really different lengths
        results = generator.generate(PROMPTS, SamplingParams(MAX_NEW, greedy=True))
        # The cache stayed on the device as OrtValues and grew to prompt + new - 1 positions.
        session = generator.sessions[0]
        past = session.past["past_key_values.0.key"]  # type: ignore[attr-defined]
        assert type(past).__name__ == "OrtValue"
        assert past.shape()[2] == max(len(r) for r in rows) + MAX_NEW - 1
    expected = hf_greedy(decoder["model"], rows, MAX_NEW)
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" and len(r.token_ids) == MAX_NEW for r in results)


def test_eos_per_row_matches_hf(decoder: dict) -> None:
    """A token the greedy run emits mid-way is made the EOS: rows stop on their own, like HF."""
    from trtpipe.generation import Generator, SamplingParams
    from trtpipe.generation.prompts import tokenize

    with Generator(decoder["fp32"]) as generator:
        free = generator.generate(PROMPTS, SamplingParams(MAX_NEW, greedy=True))
        eos = free[0].token_ids[5]
        stopped = generator.generate(
            PROMPTS, SamplingParams(MAX_NEW, greedy=True, stop_token_ids=[eos])
        )
        rows = tokenize(generator.tokenizer, PROMPTS)
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].token_ids[-1] == eos and len(stopped[0].token_ids) <= 6
    for free_row, row in zip(free, stopped, strict=True):
        cut = free_row.token_ids.index(eos) + 1 if eos in free_row.token_ids else MAX_NEW
        assert row.token_ids == free_row.token_ids[:cut]
    expected = hf_greedy(decoder["model"], rows, MAX_NEW, eos_token_id=eos)
    assert padded(stopped, len(expected[0])) == expected


def test_batch_size_and_devices_do_not_change_greedy_ids(decoder: dict) -> None:
    from trtpipe.devices import parse_devices
    from trtpipe.generation import Generator, SamplingParams

    params = SamplingParams(12, greedy=True)
    with Generator(decoder["fp32"]) as one:
        reference = [r.token_ids for r in one.generate(PROMPTS, params)]
    with Generator(decoder["fp32"], parse_devices("cpu:2")) as two:
        run = two.run(PROMPTS, params, batch_size=1)
    assert [r.token_ids for r in run.results] == reference
    assert [r.device for r in run.results] == ["cpu:0", "cpu:1", "cpu:0", "cpu:1"]
    assert len(run.ttft_s) == 4 and run.generated_tokens == 48


def test_sampling_seed_reproducible(decoder: dict) -> None:
    from trtpipe.generation import Generator, SamplingParams

    def sample(seed: int, batch_size: int) -> list[list[int]]:
        params = SamplingParams(
            16, temperature=0.9, top_k=50, top_p=0.95, seed=seed, ignore_eos=True
        )
        return [r.token_ids for r in generator.generate(PROMPTS, params, batch_size)]

    with Generator(decoder["fp32"]) as generator:
        first = sample(7, 4)
        assert sample(7, 4) == first
        assert sample(7, 1) == first  # per-prompt generators: batching does not matter
        other = sample(8, 4)
        greedy = [r.token_ids for r in generator.generate(PROMPTS, SamplingParams(16, greedy=True))]
    assert other != first
    assert first != greedy
    assert all(len(row) == 16 for row in first)


def test_stream_yields_the_same_text_as_generate(decoder: dict) -> None:
    from trtpipe.generation import Generator, SamplingParams

    params = SamplingParams(10, greedy=True)
    with Generator(decoder["fp32"]) as generator:
        whole = generator.generate([PROMPTS[1]], params)[0]
        pieces = list(generator.stream(PROMPTS[1], params))
    assert "".join(pieces) == whole.text
    assert len(pieces) >= 2


def test_limits_and_bad_parameters_are_clear_errors(decoder: dict) -> None:
    from trtpipe.generation import Generator, SamplingParams

    with Generator(decoder["fp32"]) as generator:
        spec = generator.spec
        assert (spec.max_batch, spec.max_prompt, spec.max_total) == (8, MAX_PROMPT, MAX_PAST + 1)
        long_prompt = " ".join(["fox"] * 80)
        with pytest.raises(InputError, match="longer than the engine allows"):
            generator.generate([long_prompt], SamplingParams(4))
        with pytest.raises(InputError, match="exceeds the engine's total length"):
            generator.generate(["Once"], SamplingParams(MAX_PAST + 1))
        with pytest.raises(InputError, match="top-p"):
            generator.generate(["Once"], SamplingParams(4, top_p=1.5))
        with pytest.raises(InputError, match="temperature"):
            generator.generate(["Once"], SamplingParams(4, temperature=-0.1))
        with pytest.raises(InputError, match="top-k"):
            generator.generate(["Once"], SamplingParams(4, top_k=-1))
        with pytest.raises(InputError, match="maximum batch"):
            generator.generate(PROMPTS, SamplingParams(4), batch_size=9)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "1.5"], "top-p must be in (0, 1]"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--max-new-tokens", "500"], "exceeds the engine's total length"),
    ],
)
def test_cli_rejects_bad_parameters_in_one_line(
    decoder: dict, args: list[str], message: str
) -> None:
    if decoder["name"] != "llama":
        pytest.skip("CLI checks run once")
    proc = run_cli(str(decoder["fp32"]), "--prompt", "Once", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_cli_generates_and_writes_json(decoder: dict, tmp_path: Path) -> None:
    if decoder["name"] != "gpt2":
        pytest.skip("CLI run once")
    from trtpipe.generation import Generator, SamplingParams

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:3]) + "\n")
    out = tmp_path / "out.json"
    proc = run_cli(
        str(decoder["fp32"]),
        *("--prompts-file", str(prompts_file), "--max-new-tokens", "8", "--greedy"),
        *("--batch-size", "2", "--devices", "cpu:2", "--json", str(out)),
    )
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stderr and "time to first token" in proc.stderr
    report = json.loads(out.read_text())
    with Generator(decoder["fp32"]) as generator:
        expected = generator.generate(PROMPTS[:3], SamplingParams(8, greedy=True))
    assert [r["token_ids"] for r in report["results"]] == [r.token_ids for r in expected]
    assert report["summary"]["generated_tokens"] == sum(len(r.token_ids) for r in expected)
    assert report["summary"]["tokens_per_s"] > 0


def float16_share(engine_dir: Path) -> tuple[float, float]:
    """(float16 share of the float-valued nodes of the typed graph, from the build log;
    float16 share of the float weights in the engine file)."""
    import onnx

    from trtpipe.engine import EngineDir

    engine = EngineDir(engine_dir)
    counts = json.loads((engine.path / "build_log.json").read_text())["op_counts"]
    by_dtype = counts["by_output_dtype"]
    nodes = by_dtype.get("float16", 0) / (by_dtype.get("float16", 0) + by_dtype.get("float32", 0))
    model = onnx.load(str(engine.path / engine.manifest.engine_file))
    floats = [
        i.data_type
        for i in model.graph.initializer
        if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    ]
    weights = floats.count(onnx.TensorProto.FLOAT16) / len(floats)
    return nodes, weights


def teacher_forced(
    engine_dir: Path, model_dir: Path, prompt: list[int], tokens: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Engine and HF fp32 logits [steps, vocab] at every step of HF's own greedy sequence, the
    engine fed HF's tokens one step at a time (KV cache): agreement per step, free of the drift
    that one early difference causes in free-running decoding."""
    import torch
    from transformers import AutoModelForCausalLM

    from trtpipe.engine import EngineDir
    from trtpipe.generation.sessions import decoder_session

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        full = model(torch.tensor([prompt + tokens])).logits[0].numpy()
    reference = full[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    session = decoder_session(EngineDir(engine_dir))
    session.load()
    try:
        session.start(1)
        ids = np.array([prompt], dtype=np.int64)
        steps = [session.step(ids, np.ones_like(ids), np.arange(len(prompt))[None, :])[0]]
        for step, token in enumerate(tokens[:-1]):
            length = len(prompt) + step + 1
            logits = session.step(
                np.array([[token]], np.int64),
                np.ones((1, length), np.int64),
                np.array([[length - 1]], np.int64),
            )
            steps.append(logits[0])
    finally:
        session.close()
    return np.stack(steps), reference


def test_fp16_engine_agreement_with_hf(decoder: dict, tmp_path_factory) -> None:
    """An fp16 (AutoCast) engine vs HF fp32: the engine really is fp16 (float16 nodes and
    weights, float32 I/O), and at every teacher-forced step its logits are within 0.5% of HF's
    largest |logit| (measured 0.04% llama, 0.12% gpt2) and its top-1 is HF's wherever HF's lead
    over the runner-up exceeds twice the engine's error there.

    Greedy ids alone cannot carry the claim: a random tiny model's logits are nearly flat
    (smallest top-1 lead measured 1.0e-4 against an fp16 logit error of 1.8e-4 for llama), so a
    near-tie may flip on another CPU's kernels and the continuation then differs. Free-running
    agreement is printed, not asserted (96 of 96 tokens equal for both models where measured).
    """
    from trtpipe.engine import EngineDir
    from trtpipe.generation import Generator, SamplingParams
    from trtpipe.generation.prompts import tokenize

    engine = build(decoder["onnx"], tmp_path_factory.mktemp("fp16") / "engine", "fp16")
    manifest = EngineDir(engine).manifest
    assert manifest.precision == "fp16"
    assert manifest.build_options["precision"]["method"] == "modelopt.autocast"
    assert {s.dtype for s in [*manifest.inputs, *manifest.outputs]} <= {"int64", "float32"}
    nodes, weights = float16_share(engine)
    assert nodes > 0.8 and weights > 0.8, (nodes, weights)  # measured: 0.91 / 0.93 (llama)
    with Generator(engine) as generator:
        results = generator.generate(PROMPTS, SamplingParams(MAX_NEW, greedy=True))
        rows = tokenize(generator.tokenizer, PROMPTS)
    expected = hf_greedy(decoder["model"], rows, MAX_NEW)
    worst_error, scale, decisive, agreeing, smallest_lead = 0.0, 0.0, 0, 0, np.inf
    for row, want in zip(rows, expected, strict=True):
        got, reference = teacher_forced(engine, decoder["model"], row, want)
        assert (reference.argmax(axis=1) == want).all()  # HF's greedy ids are its argmax
        error = np.abs(got - reference).max(axis=1)
        top2 = np.sort(reference, axis=1)[:, -2:]
        lead = top2[:, 1] - top2[:, 0]
        worst_error = max(worst_error, float(error.max()))
        scale = max(scale, float(np.abs(reference).max()))
        smallest_lead = min(smallest_lead, float(lead.min()))
        sure = lead > 2 * error
        decisive += int(sure.sum())
        agreeing += int((got.argmax(axis=1) == want)[sure].sum())
    free = float((np.array([r.token_ids for r in results]) == np.array(expected)).mean())
    print(
        f"\n{decoder['name']} fp16 ({nodes:.2f} of float nodes, {weights:.2f} of weights "
        f"float16) vs HF fp32: teacher-forced max logit error {worst_error:.2e} (largest "
        f"|logit| {scale:.2f}), smallest HF "
        f"lead {smallest_lead:.2e}, top-1 equal on {agreeing}/{decisive} decisive steps of "
        f"{len(PROMPTS) * MAX_NEW}; free-running greedy {free:.3f} of tokens equal"
    )
    assert worst_error <= 5e-3 * scale
    assert agreeing == decisive and decisive >= len(PROMPTS) * MAX_NEW // 2


def test_tensorrt_decoder_under_fakes_matches_onnxruntime(decoder: dict, tmp_path: Path) -> None:
    """TensorRT stepping (ping-pong KV buffers) driven through the strict TensorRT/CUDA doubles."""
    from tests.fakes.install import installed_fakes
    from trtpipe.devices import Device
    from trtpipe.generation import Generator, SamplingParams

    params = SamplingParams(MAX_NEW, greedy=True)
    with Generator(decoder["fp32"]) as reference:
        expected = [r.token_ids for r in reference.generate(PROMPTS, params)]
    with installed_fakes() as gpu:
        engine = build(decoder["onnx"], tmp_path / "trt", "fp32", backend="tensorrt")
        with Generator(engine, [Device("cuda", 0)]) as generator:
            mallocs = gpu.state.mallocs
            launches = gpu.trt.STATS["launches"]
            results = generator.generate(PROMPTS, params)
            # One launch per token, no allocation while generating.
            assert gpu.trt.STATS["launches"] - launches == MAX_NEW
            assert gpu.state.mallocs == mallocs
        assert gpu.leaks() == {"device": 0, "host": 0, "streams": 0}
    assert [r.token_ids for r in results] == expected


def test_online_bench_on_a_generation_model_says_what_to_use(decoder: dict, tmp_path: Path) -> None:
    """``bench --url`` sends KServe v2 tensor requests; a served generation engine used to get
    "not ready; check the name", though the name was right."""
    if decoder["name"] != "llama":
        pytest.skip("checked once")
    from click.testing import CliRunner

    from tests.server_utils import start_server
    from trtpipe.cli.main import cli

    server = start_server([f"llm={decoder['fp32']}"], devices=1, grpc=False)
    try:
        url = f"127.0.0.1:{server.server.http_port}"
        result = CliRunner().invoke(
            cli,
            ["bench", "--url", url, "--model", "llm", "--concurrency", "1",
             "--json", str(tmp_path / "never.json")],
        )  # fmt: skip
    finally:
        server.stop()
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"error: model 'llm' on {url} is a text-generation engine; the online bench sends "
        "tensor requests to KServe v2 infer. Add --generate to benchmark its generation on the "
        "server"
    ]
    assert list(tmp_path.iterdir()) == []
