#!/bin/sh
# Container entry point: serve every engine dir (a directory holding manifest.json) found under
# $TRTPIPE_MODELS (default /models), each under its directory name, on all interfaces.
# `trtpipe serve` options come from $TRTPIPE_SERVE_ARGS (the image's default devices) and then
# from this script's arguments, which win: docker run IMAGE --gpus 0,1 --policy least_busy
set -eu
models="${TRTPIPE_MODELS:-/models}"
found=0
for manifest in "$models"/*/manifest.json; do
    if [ -f "$manifest" ]; then
        set -- "$@" "$(dirname "$manifest")"
        found=$((found + 1))
    fi
done
if [ "$found" -eq 0 ]; then
    echo "error: no engine dirs (DIR/manifest.json) under $models;" \
        "mount them, e.g. docker run -v \"\$PWD/engines:$models\" ..." >&2
    exit 2
fi
# TRTPIPE_SERVE_ARGS holds several options: its word splitting is intended.
# shellcheck disable=SC2086
exec trtpipe serve --host 0.0.0.0 ${TRTPIPE_SERVE_ARGS:-} "$@"
