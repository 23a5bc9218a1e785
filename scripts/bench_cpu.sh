#!/usr/bin/env bash
# Reproduces docs/performance.md on CPU with the embedded all-MiniLM-L6-v2:
#   export -> build fp32/fp16/int8 (ONNX Runtime) -> accuracy gate -> fixed shapes (32 x 128)
#   -> real text end to end -> scaling over CPU workers -> online (trtpipe serve on loopback
#   + concurrency sweep).
# Writes JSON + PNG into $OUT (default bench_out/) and prints every table and a summary.
#
#   bash scripts/bench_cpu.sh                # everything (about 15-25 minutes on 2 cores)
#   QUICK=1 bash scripts/bench_cpu.sh        # fewer runs and texts, for a smoke test
#   PRECISIONS="fp32 int8" bash scripts/bench_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench_out}
TRTPIPE=${TRTPIPE:-.venv/bin/trtpipe}
PYTHON=${PYTHON:-.venv/bin/python}
PRECISIONS=${PRECISIONS:-"fp32 fp16 int8"}
# fp16 has no fast CPU kernels (ONNX Runtime casts around them): fixed shapes only.
TEXT_PRECISIONS=${TEXT_PRECISIONS:-"fp32 int8"}
CORPUS=${CORPUS:-trtpipe/data/bench_corpus.txt}
PORT=${PORT:-8000}
THREADS=${THREADS:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

RUNS=10 TEXT_RUNS=3 TEXT_LIMIT="" REQUESTS=2000 DURATION=15
if [[ -n "${QUICK:-}" ]]; then
  RUNS=3 TEXT_RUNS=1 TEXT_LIMIT="--text-limit 500" REQUESTS=200 DURATION=5
fi
THREAD_ARGS=()
[[ -n "$THREADS" ]] && THREAD_ARGS=(--threads "$THREADS")

mkdir -p "$OUT/engines"
echo "== machine: $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"

# 1. Export once, build every precision (skipped when the engine dir already exists).
if [[ ! -f "$OUT/onnx/model.onnx" ]]; then
  "$TRTPIPE" export -o "$OUT/onnx"
fi
for p in $PRECISIONS; do
  if [[ ! -f "$OUT/engines/minilm-$p/manifest.json" ]]; then
    "$TRTPIPE" build "$OUT/onnx/model.onnx" "--$p" --backend onnxruntime -o "$OUT/engines/minilm-$p"
  fi
done

# 2. Accuracy gate per engine (a failing gate is recorded, not fatal: its engine is not "best").
for p in $PRECISIONS; do
  echo; echo "== accuracy gate: $p"
  "$TRTPIPE" compare "$OUT/engines/minilm-$p" --json "$OUT/gate_$p.json" || true
done

# 3. Fixed shapes, batch 32 x 128, each engine against PyTorch eager fp32 in the same run.
for p in $PRECISIONS; do
  echo; echo "== fixed shapes: $p"
  "$TRTPIPE" bench "$OUT/engines/minilm-$p" --baseline torch --batch-sizes 32 --seq-lens 128 \
    --runs "$RUNS" --gate-report "$OUT/gate_$p.json" "${THREAD_ARGS[@]}" \
    --json "$OUT/fixed_$p.json" --plot "$OUT/fixed_$p.png"
done

# 4. Real text end to end: trtpipe batching vs the common PyTorch recipe (and PyTorch with
#    trtpipe's batching, to show how much of the gain is batching alone).
for p in $TEXT_PRECISIONS; do
  echo; echo "== real text: $p"
  # shellcheck disable=SC2086
  "$TRTPIPE" bench "$OUT/engines/minilm-$p" --baseline torch --texts "$CORPUS" $TEXT_LIMIT \
    --text-runs "$TEXT_RUNS" --sorted-baseline --gate-report "$OUT/gate_$p.json" \
    "${THREAD_ARGS[@]}" --json "$OUT/text_$p.json" --plot "$OUT/text_$p.png"
done

BEST=$("$PYTHON" scripts/bench_summary.py "$OUT" --best-engine)

# 5. Scaling over CPU workers through the device pool (N workers share the cores).
echo; echo "== scaling: $BEST over 1..$(nproc) CPU workers"
"$TRTPIPE" bench "$OUT/engines/minilm-$BEST" --devices "cpu:$(nproc)" --baseline none \
  --batch-sizes 32 --seq-lens 128 --scaling-batches 8 --runs 3 \
  --json "$OUT/scaling.json" --plot "$OUT/scaling.png"

# 6. Online: serve the best gated engine on loopback, sweep concurrency, stop the server.
echo; echo "== online: serving $BEST on 127.0.0.1:$PORT"
"$TRTPIPE" serve --name "minilm=$OUT/engines/minilm-$BEST" --http-port "$PORT" --grpc-port 0 \
  --devices cpu:1 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if "$PYTHON" -c "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:$PORT/v2/health/ready', timeout=1).status == 200 else 1)" 2>/dev/null; then
    break
  fi
  kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 1
done
"$TRTPIPE" bench --url "127.0.0.1:$PORT" --model minilm --concurrency 1,4,16,64 --seq-len 128 \
  --outputs sentence_embedding --requests "$REQUESTS" --duration "$DURATION" \
  --engine-dir "$OUT/engines/minilm-$BEST" --runs "$RUNS" "${THREAD_ARGS[@]}" \
  --json "$OUT/online.json" --plot "$OUT/online.png"
kill -TERM $SERVER && wait $SERVER || true
trap - EXIT

# 7. Summary: the table docs/performance.md quotes.
echo
"$PYTHON" scripts/bench_summary.py "$OUT"
