#!/usr/bin/env bash
# The GPU check: the plain diffusers reference loop and the service's worker path on the
# same card, in one run, printing the ratios (about 8 minutes on one H100/H200).
#
# Needs, in git-ignored folders beside the project: .gputools/gpu_reference_bench.py (the
# reference loop the targets were set against) and, where the GPU machine cannot install
# packages, the service's dependencies as wheels in .whl/, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers importlib_metadata rq redis pydantic-settings python-dotenv \
#     safetensors huggingface_hub
# then: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if ! command -v redis-server >/dev/null; then
  echo "no redis-server here: throughput.py needs one (pass --redis-url to a reachable Redis)"
fi
echo "== reference: plain diffusers loop, no compile"
timeout 240 python3 .gputools/gpu_reference_bench.py 2>&1 | tee "$OUT/reference.log" | grep -E "^(float16|bfloat16) |RESULT"
echo "== service worker path, SD 1.5 shape, 512x512, 50 steps"
timeout 240 python3 bench/throughput.py --sd15 --jobs 64 --max-batch-size 32 \
  --reference-batches 1,8,32 2>&1 | tee "$OUT/throughput.log" | grep -vE "^(INFO|WARNING)"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def result(name):
    for line in (out / name).read_text().splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
ref, ours = result("reference.log"), result("throughput.log")
if ref and ours:
    best = max(v["images_per_s"] for k, v in ref.items() if k.startswith("float16_bs"))
    one = ref["float16_bs1"]["images_per_s"]
    s = ours["service_images_per_s"]
    print(f"service {s:.2f} images/s = {s / one:.1f}x the reference one-at-a-time, "
          f"{s / best:.2f}x its best fp16 batch ({best:.2f}); one idle job "
          f"{ours['one_job_latency_s']:.3f} s")
PY
