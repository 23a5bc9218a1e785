# syntax=docker/dockerfile:1
# GPU image: trtpipe on real TensorRT + CUDA; by default it runs the GPU test suite.
#
#   docker build -t trtpipe-gpu .
#   docker run --rm --gpus all trtpipe-gpu                      # pytest -m gpu
#   docker run --rm --gpus all -v "$PWD/engines:/engines" trtpipe-gpu \
#       trtpipe build /engines/minilm/model.onnx --fp16 -o /engines/minilm-fp16
#
# The base image brings TensorRT (>= 10.12 is required; 25.08 ships 10.13 on CUDA 13.0) and its
# Python bindings. cuda-python 13 needs a host driver that supports CUDA 13. Override the base
# with --build-arg BASE_IMAGE=nvcr.io/nvidia/tensorrt:<tag>-py3; the build checks the version.
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.08-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Make sure the image's own TensorRT bindings are importable, then build a venv that sees them
# (system site-packages) so pip treats the `tensorrt` requirement of the gpu extra as met and
# never swaps in another TensorRT than the libraries in the image.
RUN python3 -c "import tensorrt" 2>/dev/null || /opt/tensorrt/python/python_setup.sh
RUN python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# PyTorch is only the accuracy reference here (compare/bench); the CPU build keeps the image small.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --upgrade pip && pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /opt/trtpipe
COPY pyproject.toml constraints.txt README.md ./
COPY trtpipe ./trtpipe
RUN pip install -c constraints.txt -e ".[gpu,dev]"
RUN python - <<'PY'
import tensorrt
major, minor = (int(p) for p in tensorrt.__version__.split(".")[:2])
assert (major, minor) >= (10, 12), f"TensorRT >= 10.12 required, found {tensorrt.__version__}"
assert not getattr(tensorrt, "IS_TEST_DOUBLE", False)
print("TensorRT", tensorrt.__version__)
PY

COPY tests ./tests
CMD ["python", "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
