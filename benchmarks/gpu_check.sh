#!/usr/bin/env bash
# The GPU check: the CUDA tests, then end-to-end figures at ImageNet-like sizes, on a machine
# with one CUDA GPU, in about 10 minutes. Results land in benchmarks/results/e2e-cuda-*.{json,md};
# copy the rows into README's GPU section.
#
#   bash benchmarks/gpu_check.sh            # everything
#   QUICK=1 bash benchmarks/gpu_check.sh    # tests + one small e2e cell (a smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible to torch")
print("gpu:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
      "torch", torch.__version__)
PY
start=$(date +%s)
# 1. The CUDA tests (the check above makes sure they do not all skip).
# test_cuda.py: every method CPU vs CUDA (TF32 off/on), bf16/fp16 vs fp32, device decoding,
# evaluate, resume, async copies; test_data.py: nvJPEG pixels against PIL's.
CI=1 timeout 600 python -m pytest -q -ra -p no:cacheprovider -m cuda tests/test_cuda.py \
  tests/test_data.py
echo "cuda tests: $(( $(date +%s) - start )) s"
# 2. End to end: decode + model + method + HDF5 against loader-only and model-only rates.
if [ -n "${QUICK:-}" ]; then
  python benchmarks/bench_e2e.py --device cuda --model resnet50 --n 256 --batch-size 128 \
    --methods gradcam --workers 8 --name e2e-cuda-quick
  exit 0
fi
for model in resnet50 vit_b_16; do
  for precision in fp32 tf32 bf16; do
    python benchmarks/bench_e2e.py --device cuda --model "$model" --precision "$precision" \
      --n 2048 --batch-size 256 --methods gradcam saliency --workers 8 \
      --name "e2e-cuda-$model-$precision"
  done
  python benchmarks/bench_e2e.py --device cuda --model "$model" --precision bf16 --decode device \
    --n 2048 --batch-size 256 --methods gradcam --workers 8 \
    --name "e2e-cuda-$model-bf16-device-decode"
done
echo "gpu_check: $(( $(date +%s) - start )) s in all"
