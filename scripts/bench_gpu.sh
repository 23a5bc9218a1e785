#!/usr/bin/env bash
# The GPU counterpart of bench_cpu.sh: TensorRT fp16/int8 engines of all-MiniLM-L6-v2 against
# PyTorch eager fp16 on the same GPU, scaling over 1..N GPUs, and the online sweep with the
# server on every GPU. Needs TensorRT, cuda-python and a CUDA build of PyTorch.
#
#   bash scripts/bench_gpu.sh                 # all visible GPUs
#   GPUS=0,1 bash scripts/bench_gpu.sh        # only these
#   QUICK=1 bash scripts/bench_gpu.sh         # fewer runs and texts
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench_out_gpu}
TRTPIPE=${TRTPIPE:-.venv/bin/trtpipe}
PYTHON=${PYTHON:-.venv/bin/python}
PRECISIONS=${PRECISIONS:-"fp16 int8"}
CORPUS=${CORPUS:-trtpipe/data/bench_corpus.txt}
PORT=${PORT:-8000}
MAX_SHAPES=${MAX_SHAPES:-input_ids:128x512}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ -z "${GPUS:-}" ]]; then
  COUNT=$("$PYTHON" -c "from trtpipe.devices import cuda_device_count as c; print(c())")
  if [[ "$COUNT" -lt 1 ]]; then
    echo "no CUDA GPU visible; use scripts/bench_cpu.sh" >&2
    exit 2
  fi
  GPUS=$(seq -s, 0 $((COUNT - 1)))
fi
FIRST=${GPUS%%,*}
"$PYTHON" -c "import tensorrt" 2>/dev/null || { echo "TensorRT is not installed" >&2; exit 2; }

RUNS=20 TEXT_RUNS=3 TEXT_LIMIT="" REQUESTS=5000 DURATION=15
if [[ -n "${QUICK:-}" ]]; then
  RUNS=5 TEXT_RUNS=1 TEXT_LIMIT="--text-limit 1000" REQUESTS=500 DURATION=5
fi

mkdir -p "$OUT/engines"
echo "== machine: $(nproc) cores; GPUs $GPUS: $(nvidia-smi --query-gpu=name --format=csv,noheader | paste -sd, -)"

if [[ ! -f "$OUT/onnx/model.onnx" ]]; then
  "$TRTPIPE" export -o "$OUT/onnx"
fi
for p in $PRECISIONS; do
  if [[ ! -f "$OUT/engines/minilm-$p/manifest.json" ]]; then
    "$TRTPIPE" build "$OUT/onnx/model.onnx" "--$p" --backend tensorrt --device "cuda:$FIRST" \
      --max-shapes "$MAX_SHAPES" --timing-cache "$OUT/timing.cache" -o "$OUT/engines/minilm-$p"
  fi
done

for p in $PRECISIONS; do
  echo; echo "== accuracy gate: $p"
  "$TRTPIPE" compare "$OUT/engines/minilm-$p" --device "cuda:$FIRST" --json "$OUT/gate_$p.json" \
    || true
done

# Fixed shapes against PyTorch eager fp16 on the same GPU (the bench picks fp16 on a GPU).
for p in $PRECISIONS; do
  echo; echo "== fixed shapes: $p"
  "$TRTPIPE" bench "$OUT/engines/minilm-$p" --device "cuda:$FIRST" --baseline torch \
    --batch-sizes 1,8,32,128 --seq-lens 32,128 --runs "$RUNS" --gate-report "$OUT/gate_$p.json" \
    --json "$OUT/fixed_$p.json" --plot "$OUT/fixed_$p.png"
done

for p in $PRECISIONS; do
  echo; echo "== real text: $p"
  # shellcheck disable=SC2086
  "$TRTPIPE" bench "$OUT/engines/minilm-$p" --device "cuda:$FIRST" --baseline torch \
    --texts "$CORPUS" $TEXT_LIMIT --text-runs "$TEXT_RUNS" --sorted-baseline \
    --gate-report "$OUT/gate_$p.json" --json "$OUT/text_$p.json" --plot "$OUT/text_$p.png"
done

BEST=$("$PYTHON" scripts/bench_summary.py "$OUT" --best-engine)

echo; echo "== scaling over GPUs $GPUS: $BEST"
"$TRTPIPE" bench "$OUT/engines/minilm-$BEST" --gpus "$GPUS" --baseline none \
  --batch-sizes 128 --seq-lens 128 --scaling-batches 64 --runs 5 \
  --json "$OUT/scaling.json" --plot "$OUT/scaling.png"

echo; echo "== online: serving $BEST on GPUs $GPUS, 127.0.0.1:$PORT"
"$TRTPIPE" serve --name "minilm=$OUT/engines/minilm-$BEST" --http-port "$PORT" --grpc-port 0 \
  --gpus "$GPUS" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  if "$PYTHON" -c "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:$PORT/v2/health/ready', timeout=1).status == 200 else 1)" 2>/dev/null; then
    break
  fi
  kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 1
done
"$TRTPIPE" bench --url "127.0.0.1:$PORT" --model minilm --concurrency 1,4,16,64,256 \
  --seq-len 128 --outputs sentence_embedding --requests "$REQUESTS" --duration "$DURATION" \
  --engine-dir "$OUT/engines/minilm-$BEST" --runs "$RUNS" \
  --json "$OUT/online.json" --plot "$OUT/online.png"
kill -TERM $SERVER && wait $SERVER || true
trap - EXIT

echo
"$PYTHON" scripts/bench_summary.py "$OUT"
