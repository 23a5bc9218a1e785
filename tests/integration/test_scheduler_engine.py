"""The continuous-batching scheduler on real decoder engines (tiny random Llama, fp32).

Every request must get exactly the tokens it gets alone (and that HF ``generate`` gives),
whatever joins or leaves the batch around it; admission must respect the engine's limits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.decoders import save_tiny_llama
from trtpipe.generation.sampling import SamplingParams
from trtpipe.generation.scheduler import Scheduler, SchedulerConfig
from trtpipe.generation.sequence import QueueSink, Sequence
from trtpipe.runtime.batcher import QueueFullError, RequestTimeoutError

# Profile: batch <= 16, prompt <= 32 tokens, past <= 64 (total length 65).
MAX_BATCH, MAX_PROMPT, MAX_PAST = 16, 32, 64
PROMPTS = [
    "The King is dead.",
    "A quick brown fox jumps over the lazy dog.",
    "Once",
    "Numbers like 42",
    "Engines generate text one token at a time",
    "Batched prompts of different lengths",
    "Long live the King.",
    "Once upon a time there was a small model",
]


def build(onnx_path: Path, out: Path, backend: str = "onnxruntime") -> Path:
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
            backend=backend,
            device=Device("cuda", 0) if backend == "tensorrt" else Device("cpu"),
            opt_shapes={"input_ids": [4, 16]},
            max_shapes={
                "input_ids": [MAX_BATCH, MAX_PROMPT],
                past.name: [MAX_BATCH, past.shape[1], MAX_PAST, past.shape[3]],
            },
        )
    )
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from trtpipe.export import export_model
    from trtpipe.generation import Generator

    root = tmp_path_factory.mktemp("sched-llama")
    model = save_tiny_llama(root / "model")
    onnx_path = export_model(str(model), root / "onnx", task="text-generation-with-past")
    engine = build(onnx_path, root / "engine")
    with Generator(engine) as generator:
        yield {"model": model, "onnx": onnx_path, "engine": engine, "generator": generator}


@pytest.fixture()
def scheduler(llama: dict) -> Iterator[Scheduler]:
    yield from make_scheduler(llama)


def make_scheduler(llama: dict, backend_session=None, **config: object) -> Iterator[Scheduler]:
    from trtpipe.generation.sessions import decoder_session

    session = backend_session or decoder_session(llama["engine"])
    session.load()
    scheduler = Scheduler(session, llama["generator"].pad_id, SchedulerConfig(**config))  # type: ignore[arg-type]
    scheduler.start()
    try:
        yield scheduler
    finally:
        scheduler.stop()
        session.close()


def request(llama: dict, prompt: str, params: SamplingParams, **kwargs: object) -> Sequence:
    generator = llama["generator"]
    ids = list(generator.tokenizer(prompt)["input_ids"])
    return Sequence(
        ids,
        params,
        QueueSink(),
        generator.decode,
        frozenset(generator.stop_ids),
        **kwargs,  # type: ignore[arg-type]
    )


def tokens(seq: Sequence) -> list[int]:
    assert isinstance(seq.sink, QueueSink)
    return [event.token_id for event in seq.sink.events(timeout=60)]


def alone(llama: dict, prompt: str, params: SamplingParams) -> list[int]:
    return llama["generator"].generate([prompt], params)[0].token_ids


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=0,
            eos_token_id=2,
        )
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_ids_are_the_same_alone_and_among_15_others(llama: dict, scheduler) -> None:
    target = PROMPTS[1]
    params = SamplingParams(20, greedy=True)
    expected = alone(llama, target, params)
    assert expected == hf_greedy(llama["model"], request(llama, target, params).prompt_ids, 20)
    others = [
        request(
            llama,
            PROMPTS[i % len(PROMPTS)] + " x" * (i % 3),
            SamplingParams(8 + i, temperature=0.9, top_k=40, seed=i) if i % 2 else params,
        )
        for i in range(15)
    ]
    mine = request(llama, target, params)
    scheduler.submit(*others[:7], mine, *others[7:])  # one admission: 16 rows
    assert tokens(mine) == expected
    for seq in others:
        tokens(seq)
    assert scheduler.stats.peak_rows == 16


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llama: dict, scheduler) -> None:
    params = SamplingParams(16, temperature=1.0, top_p=0.95, seed=1234)
    expected = alone(llama, PROMPTS[0], params)
    lone = request(llama, PROMPTS[0], params)
    scheduler.submit(lone)
    assert tokens(lone) == expected
    crowd = [request(llama, p, SamplingParams(12, temperature=0.7, seed=9)) for p in PROMPTS]
    mine = request(llama, PROMPTS[0], params)
    for seq in [*crowd[:4], mine, *crowd[4:]]:
        scheduler.submit(seq)
    assert tokens(mine) == expected
    # Different seeds in the crowd gave the same prompt other tokens (the seed is per request).
    assert tokens(crowd[0]) != lone.token_ids[:12]


def test_rows_join_and_leave_mid_run_each_get_their_own_tokens(llama: dict) -> None:
    from trtpipe.generation.sessions import decoder_session

    # Steps of at least 2 ms: on any CPU the first row is still running when the others join.
    slow = SlowSession(decoder_session(llama["engine"]), 0.002)
    for scheduler in make_scheduler(llama, backend_session=slow):
        check_rows_join_and_leave(llama, scheduler)


def check_rows_join_and_leave(llama: dict, scheduler: Scheduler) -> None:
    plans = [(PROMPTS[i], 5 + 4 * i) for i in range(len(PROMPTS))]
    first = request(llama, PROMPTS[4], SamplingParams(40, greedy=True, ignore_eos=True))
    scheduler.submit(first)
    stream = first.sink.events(timeout=60)  # type: ignore[attr-defined]
    got_first = [next(stream).token_id for _ in range(6)]  # running before the others join
    late = []
    for prompt, max_new in plans:
        seq = request(llama, prompt, SamplingParams(max_new, greedy=True))
        scheduler.submit(seq)
        late.append(seq)
        time.sleep(0.002)
    got_first += [event.token_id for event in stream]
    params_first = SamplingParams(40, greedy=True, ignore_eos=True)
    assert got_first == alone(llama, PROMPTS[4], params_first)
    for (prompt, max_new), seq in zip(plans, late, strict=True):
        assert tokens(seq) == alone(llama, prompt, SamplingParams(max_new, greedy=True))
    hf = hf_greedy(llama["model"], late[3].prompt_ids, plans[3][1])
    assert late[3].token_ids == hf
    assert scheduler.stats.rebuilds >= 1 and scheduler.stats.peak_rows > 2


def test_cancelled_request_frees_its_slot(llama: dict) -> None:
    from trtpipe.generation.sessions import decoder_session

    gated = GatedSession(decoder_session(llama["engine"]))
    for scheduler in make_scheduler(llama, backend_session=gated, max_batch_size=1):
        params = SamplingParams(50, greedy=True, ignore_eos=True)
        hog = request(llama, PROMPTS[0], params)
        waiter = request(llama, PROMPTS[2], SamplingParams(6, greedy=True, ignore_eos=True))
        scheduler.submit(hog)
        stream = hog.sink.events(timeout=60)  # type: ignore[attr-defined]
        next(stream)  # the hog's first token; its next step now waits on the gate
        scheduler.submit(waiter)
        assert scheduler.waiting == 1  # batch maximum 1: the waiter queues
        hog.cancel()
        gated.gate.set()
        assert tokens(waiter) == alone(
            llama, PROMPTS[2], SamplingParams(6, greedy=True, ignore_eos=True)
        )
        assert len(hog.token_ids) < 50
        assert scheduler.stats.cancelled == 1 and scheduler.stats.peak_rows == 1
        deadline = time.monotonic() + 10
        while scheduler.slots_in_use and time.monotonic() < deadline:
            time.sleep(0.01)  # the thread empties the batch right after the last event
        assert scheduler.running == 0 and scheduler.slots_in_use == 0


def test_admission_waits_for_kv_room_and_never_evicts(llama: dict, scheduler) -> None:
    long_params = SamplingParams(50, greedy=True, ignore_eos=True)
    long = request(llama, PROMPTS[3], long_params)  # 8 tokens + 50
    scheduler.submit(long)
    stream = long.sink.events(timeout=60)  # type: ignore[attr-defined]
    next(stream)
    # 2 tokens + 63 fits the engine alone (65), but beside the long row the rebuilt width
    # (>= 8) plus 62 more tokens would pass the 64 cache positions: it must wait, not evict.
    blocked_params = SamplingParams(MAX_PAST + 1 - 2, greedy=True, ignore_eos=True)
    blocked = request(llama, PROMPTS[2], blocked_params)
    assert len(blocked.prompt_ids) == 2
    scheduler.submit(blocked)
    rest = [event.token_id for event in stream]
    finished_at = time.monotonic()
    got = tokens(blocked)
    assert blocked.first_token_at is not None and blocked.first_token_at >= finished_at - 0.05
    assert [long.token_ids[0], *rest] == alone(llama, PROMPTS[3], long_params)
    assert got == alone(llama, PROMPTS[2], blocked_params)
    assert scheduler.stats.peak_rows == 1


class SlowSession:
    """A real decoder session whose steps take at least ``delay`` seconds (timeouts)."""

    def __init__(self, session, delay: float):
        self.inner, self.delay = session, delay

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def step(self, *args):
        time.sleep(self.delay)
        return self.inner.step(*args)


class GatedSession:
    """A real decoder session whose steps after the first wait until ``gate`` is set.

    It holds a running row in place on any machine speed, where a sleep would race a fast CPU.
    """

    def __init__(self, session):
        self.inner, self.gate, self.steps = session, threading.Event(), 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def step(self, *args):
        self.steps += 1
        if self.steps > 1:
            assert self.gate.wait(60), "the test never opened the gate"
        return self.inner.step(*args)


def test_batch_limit_queue_limit_and_timeout(llama: dict) -> None:
    from trtpipe.generation.sessions import decoder_session

    slow = SlowSession(decoder_session(llama["engine"]), 0.01)
    config = {"max_batch_size": 3, "max_queue_size": 4, "timeout_s": 0.2}
    for scheduler in make_scheduler(llama, backend_session=slow, **config):
        params = SamplingParams(30, greedy=True, ignore_eos=True)  # >= 0.3 s of steps
        running = [request(llama, p, params) for p in PROMPTS[:3]]
        scheduler.submit(*running)
        next(running[0].sink.events(timeout=60))  # type: ignore[attr-defined]
        waiting = [request(llama, p, params) for p in PROMPTS[3:7]]
        scheduler.submit(*waiting)
        with pytest.raises(QueueFullError):
            scheduler.submit(request(llama, PROMPTS[7], params))
        for seq in running:
            assert len(finished_tokens(seq)) == 30
        for seq in waiting:
            with pytest.raises(RequestTimeoutError):
                tokens(seq)
        assert scheduler.stats.peak_rows == 3
        assert (scheduler.stats.timed_out, scheduler.stats.rejected) == (4, 1)


def test_drain_finishes_running_rows_and_refuses_the_rest(llama: dict) -> None:
    from trtpipe.generation.sessions import decoder_session
    from trtpipe.runtime.batcher import BatcherStoppedError

    gated = GatedSession(decoder_session(llama["engine"]))
    for scheduler in make_scheduler(llama, backend_session=gated, max_batch_size=1):
        params = SamplingParams(20, greedy=True, ignore_eos=True)
        running, queued = request(llama, PROMPTS[0], params), request(llama, PROMPTS[1], params)
        scheduler.submit(running)
        next(running.sink.events(timeout=60))  # type: ignore[attr-defined]
        scheduler.submit(queued)
        stopper = threading.Thread(target=scheduler.stop)
        stopper.start()
        deadline = time.monotonic() + 30
        while scheduler.waiting and time.monotonic() < deadline:
            time.sleep(0.01)  # the stop refuses the queue while the running row is held
        gated.gate.set()
        stopper.join(60)
        assert len(running.token_ids) == 20
        with pytest.raises(BatcherStoppedError):
            tokens(queued)
        with pytest.raises(BatcherStoppedError):
            scheduler.submit(request(llama, PROMPTS[2], params))


def test_tensorrt_session_under_fakes_batches_like_onnxruntime(llama: dict, tmp_path) -> None:
    """The same scheduler over the TensorRT decoder session (strict TensorRT/CUDA doubles)."""
    from tests.fakes.install import installed_fakes
    from trtpipe.devices import Device
    from trtpipe.generation.tensorrt import TensorRTDecoderSession

    plans = [(p, 4 + 3 * i) for i, p in enumerate(PROMPTS[:6])]
    expected = [alone(llama, p, SamplingParams(n, greedy=True, ignore_eos=True)) for p, n in plans]
    with installed_fakes() as gpu:
        from trtpipe.engine import EngineDir

        engine = build(llama["onnx"], tmp_path / "trt", backend="tensorrt")
        session = TensorRTDecoderSession(EngineDir(engine), Device("cuda", 0))
        for scheduler in make_scheduler(llama, backend_session=session):
            seqs = []
            for i, (prompt, n) in enumerate(plans):
                seq = request(llama, prompt, SamplingParams(n, greedy=True, ignore_eos=True))
                scheduler.submit(seq)
                seqs.append(seq)
                if i == 2:  # the rest join a running batch
                    next(seqs[0].sink.events(timeout=60))  # type: ignore[attr-defined]
            got = [finished_tokens(seq) for seq in seqs]
            assert scheduler.stats.rebuilds >= 1
        assert gpu.leaks() == {"device": 0, "host": 0, "streams": 0}
    assert got == expected


def finished_tokens(seq: Sequence) -> list[int]:
    """All of a sequence's tokens once it has finished (some events may have been read)."""
    deadline = time.monotonic() + 60
    while seq.finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return seq.token_ids
