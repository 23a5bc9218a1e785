"""The OpenAI generation surface on a real server, driven by the ``openai`` client: chat
template, stop sequences, n > 1, logprobs, usage, /v1/models/{id}."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.decoders import save_tiny_llama

PLAIN, CHAT = "tiny-llama", "tiny-chat"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Once upon a time"},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from tests.server_utils import start_server
    from trtpipe.build import BuildConfig, build_engine_dir
    from trtpipe.export import export_model
    from trtpipe.generation import Generator

    root = tmp_path_factory.mktemp("gen-serving")
    model = save_tiny_llama(root / "model")
    onnx_path = export_model(str(model), root / "onnx", task="text-generation-with-past")
    engine = root / "engine"
    build_engine_dir(BuildConfig(onnx_path=onnx_path, output=engine, backend="onnxruntime"))
    chat_engine = root / "chat-engine"
    shutil.copytree(engine, chat_engine)
    config_path = chat_engine / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    thread = start_server([f"{PLAIN}={engine}", f"{CHAT}={chat_engine}"], devices=1)
    reference = Generator(engine)
    yield {
        "url": f"http://127.0.0.1:{thread.server.http_port}",
        "grpc_port": thread.server.grpc_port,
        "engine": engine,
        "model": model,
        "chat_engine": chat_engine,
        "reference": reference,
    }
    thread.stop()
    reference.close()


def client(served: dict):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)


def hf_greedy(model_dir: Path, ids: list[int], max_new: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=0,
            eos_token_id=2,
        )
    return out[0, len(ids) :].tolist()


def test_chat_applies_the_template_as_hf_does(served: dict) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(served["chat_engine"]))
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    expected = hf_greedy(served["model"], list(ids), 10)
    reply = client(served).chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=10, temperature=0
    )
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(expected)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)

    stream = client(served).chat.completions.create(
        model=CHAT,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == reply.choices[0].finish_reason


def test_chat_without_a_template_is_a_400(served: dict) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client(served).chat.completions.create(model=PLAIN, messages=MESSAGES)


def test_stop_sequences_cut_the_text(served: dict) -> None:
    prompt = "The King is dead."
    full = client(served).completions.create(
        model=PLAIN, prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    assert len(text) > 12
    stop = text[6:9]
    cut = text[: text.index(stop)]
    reply = client(served).completions.create(
        model=PLAIN,
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        stop=[stop, "never-there"],
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].text == cut
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < full.usage.completion_tokens
    pieces = list(
        client(served).completions.create(
            model=PLAIN,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(p.choices[0].text for p in pieces) == cut
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_n_choices_are_seeded_per_choice_like_offline_rows(served: dict) -> None:
    from trtpipe.generation import SamplingParams

    prompt = "Once upon a time"
    params = SamplingParams(12, temperature=0.9, top_k=50, seed=21)
    expected = served["reference"].generate([prompt] * 3, params)
    reply = client(served).completions.create(
        model=PLAIN, prompt=prompt, max_tokens=12, temperature=0.9, seed=21, n=3,
        extra_body={"top_k": 50},
    )  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [r.text for r in expected]
    assert len({c.text for c in reply.choices}) > 1
    assert reply.usage.completion_tokens == sum(len(r.token_ids) for r in expected)
    assert reply.usage.prompt_tokens == expected[0].prompt_tokens


def test_logprobs_are_the_models_log_softmax(served: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtpipe.generation import SamplingParams

    prompt = "A quick brown fox"
    reply = client(served).completions.create(
        model=PLAIN, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == reply.usage.completion_tokens == 6
    # (A dict by token text: two ids that decode alike share one key, as with OpenAI.)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    # Greedy: the chosen token is the best alternative.
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)
    # Teacher-forced HF logits give the same log-probabilities.
    tokenizer = AutoTokenizer.from_pretrained(str(served["model"]))
    model = AutoModelForCausalLM.from_pretrained(str(served["model"])).eval()
    prompt_ids = tokenizer(prompt)["input_ids"]
    params = SamplingParams(6, greedy=True, ignore_eos=True)
    generated = served["reference"].generate([prompt], params)[0].token_ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0].double()
    logp = torch.log_softmax(logits, -1).numpy()
    want = [logp[len(prompt_ids) - 1 + i, t] for i, t in enumerate(generated)]
    np.testing.assert_allclose(logprobs.token_logprobs, want, atol=1e-4)


def test_models_endpoint_answers_for_one_model(served: dict) -> None:
    import openai

    assert client(served).models.retrieve(PLAIN).id == PLAIN
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        client(served).models.retrieve("nope")
    reply = httpx.post(
        served["url"] + "/v2/models/tiny-llama/generate",
        json={"text_input": "Once", "parameters": {"max_tokens": 4, "temperature": 0}},
        timeout=30,
    )
    assert reply.json()["usage"]["completion_tokens"] == len(reply.json()["token_ids"])


def test_served_generation_bench_counts_every_token(served: dict) -> None:
    from trtpipe.bench.served_generation import benchmark_served_generation, markdown_table

    result = benchmark_served_generation(
        served["url"], PLAIN, None, ["Once", "The King is dead."], (1, 2), 5, requests=4
    )
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["requests"] == 4
        assert level["generated_tokens"] == 4 * 5  # EOS ignored: exactly max tokens each
        assert level["ttft_ms_p50"] > 0 and level["tokens_per_s"] > 0
    assert "| c2 |" in markdown_table(result)


def test_generation_model_over_grpc_and_in_prometheus(served: dict) -> None:
    import tritonclient.grpc as grpcclient

    url = f"127.0.0.1:{served['grpc_port']}"
    with grpcclient.InferenceServerClient(url) as grpc_client:
        assert grpc_client.is_model_ready(PLAIN)
        metadata = grpc_client.get_model_metadata(PLAIN, as_json=True)
    assert metadata["name"] == PLAIN
    assert [t["name"] for t in metadata["inputs"]][:2] == ["text_input", "max_tokens"]
    client(served).completions.create(model=PLAIN, prompt="Once", max_tokens=3, temperature=0)
    text = httpx.get(served["url"] + "/metrics", timeout=10).text
    series = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("trtpipe_generation") and f'model="{PLAIN}"' in line
        and "_bucket" not in line
    }  # fmt: skip
    assert series["trtpipe_generation_generated_tokens"] >= 3
    assert series["trtpipe_generation_requests_finished"] >= 1
    assert series["trtpipe_generation_time_to_first_token_seconds_count"] >= 1
    assert series["trtpipe_generation_running_sequences"] == 0
    assert series["trtpipe_generation_kv_slots"] > 0


def test_closed_stream_frees_its_row(served: dict) -> None:
    import time

    body = {"model": PLAIN, "prompt": "Once", "max_tokens": 200, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    before = generation_series(served)
    with httpx.stream("POST", served["url"] + "/v1/completions", json=body, timeout=30) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
    # The connection is gone: the row is retired at the next step and counted as cancelled.
    deadline, series = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        series = generation_series(served)
        if (
            series["trtpipe_generation_requests_cancelled"]
            > before["trtpipe_generation_requests_cancelled"]
        ):
            break
        time.sleep(0.05)
    cancelled = "trtpipe_generation_requests_cancelled"
    assert series[cancelled] == before[cancelled] + 1
    assert series["trtpipe_generation_running_sequences"] == 0
    generated = "trtpipe_generation_generated_tokens"
    assert series[generated] - before[generated] < 200  # it never ran to its end


def generation_series(served: dict) -> dict[str, float]:
    text = httpx.get(served["url"] + "/metrics", timeout=10).text
    return {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("trtpipe_generation") and f'model="{PLAIN}"' in line
        and "_bucket" not in line
    }  # fmt: skip


def test_stop_lets_running_streams_finish(served: dict) -> None:
    import threading

    from tests.server_utils import start_server

    thread = start_server([f"{PLAIN}={served['engine']}"], devices=1, grpc=False)
    url = f"http://127.0.0.1:{thread.server.http_port}/v1/completions"
    body = {"model": PLAIN, "prompt": "Once", "max_tokens": 60, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    tokens, finish = 0, None
    stopper = threading.Thread(target=thread.stop)
    with httpx.stream("POST", url, json=body, timeout=60) as reply:
        for line in reply.iter_lines():
            if not line.startswith('data: {"id"'):
                continue
            event = json.loads(line[len("data: ") :])
            tokens += 1
            finish = event["choices"][0]["finish_reason"] or finish
            if tokens == 3:
                stopper.start()  # SIGTERM's path: drain while this stream runs
    stopper.join(60)
    assert (tokens, finish) == (60, "length")


def test_generation_model_is_first_class_on_v2(served: dict) -> None:
    base = served["url"] + f"/v2/models/{PLAIN}"
    metadata = httpx.get(base, timeout=10).json()
    assert metadata["name"] == PLAIN and metadata["versions"] == ["1"]
    assert [t["name"] for t in metadata["outputs"]] == ["text_output"]
    ready = httpx.get(base + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    config = httpx.get(base + "/config", timeout=10).json()
    assert config["model_transaction_policy"] == {"decoupled": True}
    assert config["max_batch_size"] == 32  # the engine's profile maximum
    client(served).completions.create(model=PLAIN, prompt="Once", max_tokens=2, temperature=0)
    stats = httpx.get(base + "/stats", timeout=10).json()["model_stats"][0]
    assert stats["name"] == PLAIN and stats["inference_count"] >= 1
    assert stats["generation_stats"]["generated_tokens"] >= 2
    every = httpx.get(served["url"] + "/v2/models/stats", timeout=10).json()["model_stats"]
    assert {PLAIN, CHAT} <= {s["name"] for s in every}
    assert PLAIN in httpx.get(served["url"] + "/v2/health/ready", timeout=10).json()["models"]
    assert httpx.get(base + "/versions/2", timeout=10).status_code == 404
