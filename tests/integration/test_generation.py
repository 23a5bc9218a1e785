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


def test_fp16_engine_agreement_with_hf(decoder: dict, tmp_path_factory) -> None:
    """fp16 (AutoCast) engine vs HF fp32 greedy: report the fraction of equal tokens."""
    from trtpipe.generation import Generator, SamplingParams
    from trtpipe.generation.prompts import tokenize

    engine = build(decoder["onnx"], tmp_path_factory.mktemp("fp16") / "engine", "fp16")
    with Generator(engine) as generator:
        results = generator.generate(PROMPTS, SamplingParams(MAX_NEW, greedy=True))
        rows = tokenize(generator.tokenizer, PROMPTS)
    expected = np.array(hf_greedy(decoder["model"], rows, MAX_NEW))
    got = np.array([r.token_ids for r in results])
    equal = float((got == expected).mean())
    first = float((got[:, 0] == expected[:, 0]).mean())
    print(f"\n{decoder['name']} fp16 vs HF fp32 greedy: {equal:.3f} of tokens equal, first {first}")
    assert first == 1.0
    assert equal >= 0.5


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
