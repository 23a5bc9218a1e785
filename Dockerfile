# syntax=docker/dockerfile:1
# GPU image: trtpipe on TensorRT + CUDA 12, serving the engine dirs mounted at /models.
#
#   docker build -t trtpipe-gpu .                          # the server (default target)
#   docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -v "$PWD/engines:/models" trtpipe-gpu
#   docker run --rm --gpus all -v "$PWD/engines:/models" trtpipe-gpu --gpus 0,1   # serve options
#   docker run --rm --gpus all -v "$PWD:/work" --entrypoint trtpipe trtpipe-gpu \
#       build /work/out/minilm/model.onnx --fp16 -o /work/engines/minilm-fp16
#   docker build --target test -t trtpipe-gpu-test . && docker run --rm --gpus all trtpipe-gpu-test
#
# One CUDA major throughout: the pinned onnxruntime-gpu and cupy-cuda12x wheels are CUDA 12
# builds, so the base is CUDA 12 (with cuDNN 9 for ONNX Runtime's CUDA provider), TensorRT and
# cuda-python come as their CUDA 12 wheels, and PyTorch (the fp16 GPU baseline of `bench` and
# the reference of `compare`) is its CUDA 12 build. Needs a driver for CUDA 12.9 or newer.
# Engines are tied to the GPU architecture and TensorRT version: build them with this image.
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04

# -- runtime: trtpipe and its GPU libraries -------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime

# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

# Distribution Python (3.12 on Ubuntu 24.04) in a venv; apt versions follow the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# PyTorch's CUDA 12 build: pass the cu12x index PyTorch publishes for TORCH_SPEC if it differs.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch==2.13.0
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /opt/trtpipe
COPY pyproject.toml constraints.txt README.md ./
COPY trtpipe ./trtpipe
# Versions come from constraints.txt, less its cuda-python 13 pins (the CI machine's): this
# image is CUDA 12 throughout. TensorRT's wheels are served from NVIDIA's index.
ARG PIP_EXTRA_INDEX_URL=https://pypi.nvidia.com
# hadolint ignore=DL3013
RUN grep -v '^cuda-' constraints.txt > constraints-cu12.txt \
    && pip install -c constraints-cu12.txt ".[gpu-cu12]"
COPY scripts ./scripts
RUN python scripts/check_gpu_stack.py 12

# -- test: the GPU test suite (docker build --target test) ----------------------------------
FROM runtime AS test
# hadolint ignore=DL3013
RUN pip install -c constraints-cu12.txt pytest pytest-timeout httpx openai
COPY tests ./tests
CMD ["python", "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests"]

# -- serve (default): the engine dirs mounted under /models, HTTP 8000 and gRPC 8001 -------
FROM runtime AS serve
# An unprivileged user; HOME for any library cache (the image works offline).
RUN useradd --system --uid 10001 --no-create-home trtpipe
USER 10001
ENV HOME=/tmp \
    TRTPIPE_MODELS=/models \
    TRTPIPE_SERVE_ARGS="--gpus 0"
VOLUME ["/models"]
EXPOSE 8000 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["/opt/trtpipe/scripts/docker_serve.sh"]
CMD []
