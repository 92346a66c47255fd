#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one run (device time is short): writes one markdown file per
# part into OUTDIR (default ./gpu-out), each part under its own time limit, the most wanted first.
#   bash benchmarks/gpu_run.sh [OUTDIR]
# Where the machine lacks the server packages (fastapi, celery, …), wheels in ./.whl are installed into
# /tmp/site first (the device tool's way: see BENCHMARKS.md, "GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import fastapi, celery, sqlalchemy" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} > "$OUT/env.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run one part under its limit, output to OUT/NAME.md
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.md" 2>&1
  echo "   exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/$name.md"
}
T="python3 benchmarks/gpu_throughput.py"
part wrn 75 $T --models wrn28_10 --precisions bf16-cl --methods source,bn_adapt,tent,eata,sar,cotta,rmt,roid \
  --profile roid --budget-s 60
part service 200 python3 benchmarks/gpu_service_check.py --images 50000
part compile 130 $T --models wrn28_10 --precisions bf16-cl-compile --methods tent,rmt --budget-s 90
part seg 80 $T --models lraspp,deeplabv3_mnv3,deeplabv3_r50 --precisions bf16-cl --budget-s 60
part r50 45 $T --models resnet50 --precisions bf16-cl --methods tent,cotta,rmt,roid --budget-s 30
part cotta_confident 35 $T --models wrn28_10,resnet50 --precisions bf16-cl --methods cotta --confident --budget-s 20
tail -n 3 "$OUT"/*.md
