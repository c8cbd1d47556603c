#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one call (a few minutes on an H100), plus the tests
# that need CUDA (the round makes no host sync; DDP over NCCL is in tests/lib/test_distributed.py).
#   PYTHONPATH=src bash benchmarks/gpu.sh OUT     (writes OUT/ and OUT.tgz)
set -euo pipefail
out=${1:-results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" >> "$out/gpu.txt"
python benchmarks/run.py overhead overhead-resnet50 overhead-resnet50-bf16 epochs update memory \
    --out "$out"
python benchmarks/overhead.py --model small-cnn --compile --json "$out/overhead-compile.json" \
    > "$out/overhead-compile.txt"
python -m pytest -q -p no:cacheprovider tests/lib/test_sync_free.py tests/lib/test_distributed.py \
    2>&1 | tee "$out/tests-cuda.txt"
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"  # one file to bring back
