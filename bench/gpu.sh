#!/usr/bin/env bash
# The GPU benchmark (issue 20) in ONE call of a machine without internet: bench/RESULTS.md says
# how to download the wheels it lacks into .whl/ first. Run from the repository root:
#
#   OUT=/some/dir BUDGET_S=560 bash bench/gpu.sh
#   OUT=/some/dir BENCH_ARGS="--skip-serve" bash bench/gpu.sh    # more bench.run options
#
# Writes, as it goes (a run cut off still leaves what it measured): $OUT/versions.txt,
# $OUT/bench.log and $OUT/bench/ (the 1024² run: results.md/.json, server.log, profiles), then,
# with the time left, $OUT/bench512.tgz (single-image latency at 512², in-process rows).
set -u
OUT=${OUT:?set OUT to the results folder}
BUDGET_S=${BUDGET_S:-560}
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script with the tiny model
deadline=$((SECONDS + BUDGET_S))
mkdir -p "$OUT"
if [ "$DEVICE" != cpu ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 --version
  python3 -c "import torch, diffusers, transformers, peft, bentoml, accelerate, pydantic
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
for m in (diffusers, transformers, peft, bentoml, accelerate, pydantic): print(m.__name__, m.__version__)"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

left() { echo $((deadline - SECONDS)); }
timeout "$(left)" python3 -m bench.run --device "$DEVICE" --repeats 2 --requests 8 \
  --concurrency 1,4,16 --profile --server-timeout 180 ${BENCH_ARGS:-} --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "1024 run: rc=$? at ${SECONDS}s"
if [ "$(left)" -gt 100 ]; then
  timeout "$(left)" python3 -m bench.run --device "$DEVICE" --size 512 --batch 1 --repeats 5 \
    --skip-http --skip-train --out /tmp/bench512 > /tmp/bench512.log 2>&1
  echo "512 run: rc=$? at ${SECONDS}s"
  cp /tmp/bench512.log /tmp/bench512/ 2>/dev/null
  tar czf "$OUT/bench512.tgz" -C /tmp bench512
fi
tail -60 "$OUT/bench.log"
