"""Check that the GPU libraries agree: TensorRT >= 10.12 (real, not the test double), CUDA 12
PyTorch, ONNX Runtime with its CUDA provider, cuda-python importable. The GPU image runs it at
build time; run it anywhere to check a GPU environment (no GPU needed for the import checks).
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        import onnxruntime
        import tensorrt
        import torch
        from cuda.bindings import runtime  # noqa: F401  (cuda-python >= 12.6)
    except ImportError as exc:
        print(f"error: {exc.name or exc} is not installed ({exc})", file=sys.stderr)
        return 1

    expected_cuda = sys.argv[1] if len(sys.argv) > 1 else "12"
    problems = []
    major, minor = (int(p) for p in tensorrt.__version__.split(".")[:2])
    if (major, minor) < (10, 12):
        problems.append(f"TensorRT >= 10.12 required, found {tensorrt.__version__}")
    if getattr(tensorrt, "IS_TEST_DOUBLE", False):
        problems.append("tensorrt is the test double, not TensorRT")
    if not (torch.version.cuda or "").startswith(f"{expected_cuda}."):
        problems.append(f"PyTorch is built for CUDA {torch.version.cuda}, not {expected_cuda}")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        problems.append("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    print(
        f"TensorRT {tensorrt.__version__}, PyTorch {torch.__version__} (CUDA {torch.version.cuda}),"
        f" ONNX Runtime {onnxruntime.__version__}"
    )
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
