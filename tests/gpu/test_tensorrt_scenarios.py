"""More TensorRT scenarios for a machine with TensorRT and CUDA: decoder KV ping-pong, an INT8
Q/DQ build, a model with external data, and a pool over two GPUs.

Written against the real APIs and run under the strict fakes' equivalents in CI
(tests/unit/test_tensorrt_fake.py, tests/integration/test_tensorrt_fake.py); these real-hardware
versions skip without the ``tensorrt`` package, cuda-python or a visible GPU (the two-GPU test
without a second GPU).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")

from trtpipe.build import BuildConfig, build_engine_dir  # noqa: E402
from trtpipe.devices import Device, cuda_device_count  # noqa: E402
from trtpipe.engine import EngineDir  # noqa: E402
from trtpipe.runners import runner_for  # noqa: E402
from trtpipe.runners.onnxruntime import OnnxRuntimeRunner  # noqa: E402

if getattr(trt, "IS_TEST_DOUBLE", False):  # never test the double as if it were TensorRT
    pytest.skip("the tensorrt module is a test double", allow_module_level=True)
if cuda_device_count() == 0:
    pytest.skip("no CUDA GPU visible", allow_module_level=True)

GPU = Device("cuda", 0)


def bert_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def reference_hidden(tiny_bert_engine: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with OnnxRuntimeRunner(EngineDir(tiny_bert_engine), Device("cpu")) as reference:
        return reference.infer(feeds)["last_hidden_state"]


# -- decoder: KV cache kept on the GPU, ping-pong buffers --------------------------------------
@pytest.fixture(scope="module")
def tiny_llama_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.decoders import save_tiny_llama
    from trtpipe.export import export_model

    root = tmp_path_factory.mktemp("gpu-llama")
    model_dir = save_tiny_llama(root / "model")
    return export_model(str(model_dir), root / "onnx", task="text-generation-with-past")


def build_decoder(onnx_path: Path, out: Path, backend: str) -> EngineDir:
    import onnx

    from trtpipe.build.profile import onnx_io_specs

    inputs, _ = onnx_io_specs(onnx.load(str(onnx_path), load_external_data=False))
    past = next(s for s in inputs if s.name == "past_key_values.0.key")
    return build_engine_dir(
        BuildConfig(
            onnx_path=onnx_path,
            output=out,
            backend=backend,
            device=GPU if backend == "tensorrt" else Device("cpu"),
            opt_shapes={"input_ids": [2, 8]},
            max_shapes={"input_ids": [4, 16], past.name: [4, past.shape[1], 48, past.shape[3]]},
        )
    )


def test_decoder_kv_ping_pong_matches_onnxruntime(tiny_llama_onnx: Path, tmp_path: Path):
    """Teacher-forced: both sessions get the same tokens; every step's logits must agree."""
    from trtpipe.generation.sessions import decoder_session

    trt_engine = build_decoder(tiny_llama_onnx, tmp_path / "trt", "tensorrt")
    ort_engine = build_decoder(tiny_llama_onnx, tmp_path / "ort", "onnxruntime")
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 300, size=(3, 9), dtype=np.int64)
    sessions = [decoder_session(trt_engine, GPU), decoder_session(ort_engine, Device("cpu"))]
    for session in sessions:
        session.load()
        session.start(3)
    trt_session, ort_session = sessions
    spec = trt_session.spec
    memory = trt_session.memory_bytes()  # type: ignore[attr-defined]
    staged = spec.max_batch * spec.max_prompt * 8 * (2 if spec.has_position_ids else 1)
    staged += spec.max_batch * spec.max_total * 8  # attention mask
    assert memory["pinned_host"] == staged + spec.max_batch * spec.vocab_size * 4
    try:
        ids, length = prompt, 0
        for _ in range(20):
            length += ids.shape[1]
            mask = np.ones((3, length), np.int64)
            positions = np.arange(length - ids.shape[1], length, dtype=np.int64)[None].repeat(3, 0)
            got = trt_session.step(ids, mask, positions)
            want = ort_session.step(ids, mask, positions)
            # TensorRT may use TF32 for FP32 matmuls: a TF32-sized tolerance.
            np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
            assert cosine_rows(got, want).min() > 0.9999
            ids = want.argmax(1)[:, None].astype(np.int64)
    finally:
        for session in sessions:
            session.close()


@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
def test_toy_decoder_keeps_its_kv_dtype_on_the_gpu(tmp_path: Path, kv_dtype: str):
    """The toy decoder of the fakes on real TensorRT: tokens depend on the whole cache."""
    from tests.fakes.models import build_toy_decoder, toy_greedy
    from trtpipe.generation.tensorrt import TensorRTDecoderSession

    session = TensorRTDecoderSession(EngineDir(build_toy_decoder(tmp_path, kv_dtype)), GPU)
    session.load()
    try:
        prompts = [[5, 9, 3], [0, 7, 11]]
        session.start(2)
        ids, got = np.array(prompts, np.int64), [[], []]
        for _ in range(12):
            length = session.past_length + ids.shape[1]
            logits = session.step(ids, np.ones((2, length), np.int64), np.zeros_like(ids))
            nxt = logits.argmax(1)
            for row, token in enumerate(nxt):
                got[row].append(int(token))
            ids = nxt[:, None].astype(np.int64)
        assert got == toy_greedy(prompts, 12)
    finally:
        session.close()


# -- INT8 Q/DQ and external data -------------------------------------------------------------
def test_int8_qdq_build_runs_close_to_fp32(
    tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path: Path
):
    engine = build_engine_dir(
        BuildConfig(
            onnx_path=tiny_bert_onnx,
            output=tmp_path / "int8",
            precision="int8",
            backend="tensorrt",
            device=GPU,
            max_shapes={"input_ids": [8, 64]},
        )
    )
    assert engine.manifest.precision == "int8" and engine.manifest.backend == "tensorrt"
    feeds = bert_feeds(4, 20)
    with runner_for(engine, GPU) as trt_runner:
        got = trt_runner.infer(feeds)["last_hidden_state"]
    want = reference_hidden(tiny_bert_engine, feeds)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert cosine_rows(got, want).min() >= 0.97


def test_fp32_build_with_external_data(
    tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path: Path
):
    import onnx

    export = tmp_path / "export"
    shutil.copytree(tiny_bert_onnx.parent, export)
    onnx.save_model(
        onnx.load(str(export / "model.onnx")), str(export / "model.onnx"),
        save_as_external_data=True, location="model.onnx_data", size_threshold=0,
    )  # fmt: skip
    engine = build_engine_dir(
        BuildConfig(
            onnx_path=export / "model.onnx",
            output=tmp_path / "engine",
            backend="tensorrt",
            device=GPU,
            max_shapes={"input_ids": [8, 64]},
        )
    )
    feeds = bert_feeds(3, 17)
    with runner_for(engine, GPU) as trt_runner:
        got = trt_runner.infer(feeds)["last_hidden_state"]
    np.testing.assert_allclose(got, reference_hidden(tiny_bert_engine, feeds), atol=2e-3, rtol=0)


# -- two GPUs ----------------------------------------------------------------------------------
@pytest.mark.skipif(cuda_device_count() < 2, reason="needs two CUDA GPUs")
def test_pool_over_two_gpus(tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path: Path):
    """One runner per GPU, batches dealt round-robin, every answer equal to ONNX Runtime's."""
    from trtpipe.runtime.pool import DevicePool

    engine = build_engine_dir(
        BuildConfig(
            onnx_path=tiny_bert_onnx,
            output=tmp_path / "engine",
            backend="tensorrt",
            device=GPU,
            max_shapes={"input_ids": [8, 64]},
        )
    )
    pool = DevicePool.for_engine(
        engine, [Device("cuda", 0), Device("cuda", 1)], policy="round_robin"
    )
    pool.start()
    try:
        for seed in range(6):
            feeds = bert_feeds(2 + seed % 3, 16, seed=seed)
            got = pool.run_sync(feeds)["last_hidden_state"]
            want = reference_hidden(tiny_bert_engine, feeds)
            np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
        executions = [status["executions"] for status in pool.devices_status()]
        assert len(executions) == 2 and min(executions) >= 3, executions
    finally:
        pool.close()
