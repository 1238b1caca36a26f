#!/usr/bin/env bash
# Every GPU check and benchmark of one device session, in one run (issues 10 and 11), all output
# under $OUT. Run from the repository root on the GPU machine, with `.whl` carried (PyHessian's
# wheel: `pip download --no-deps pyhessian==0.1 -d .whl` here, `.whl` ignored by git):
#
#     BUDGET=300 bash benchmarks/gpu_session.sh        # give the device call a 590 s limit
#     BUDGET=330 ONLY="auto,HessianMonitor defaults" SKIP="basis_device" GPU_ARGS=--no-tf32 bash ...
#
# 1. the monitors in GPU Trainers against CPU float64 oracles (fused attention, cuDNN LSTM,
#    compiled MLP, FSDP2 and FSDPStrategy at world size 1): gpu_checks.py -> checks.log/.json;
# 2. the CUDA-only tests (kernels; the basis spilled to pinned host memory) -> cuda_tests.log;
# 3. gpu.py within $BUDGET seconds: products, memory (pieces and whole batches), λ_max at
#    equal accuracy against PyHessian, trace, density -> gpu.md, gpu.json, gpu.log;
# 4. conv_ab.py: ResNet-18's cached product with PyTorch's convolution double backward and with
#    curvature/conv.py's -> conv_ab.log;
# 5. with PROFILE=1 (give BUDGET 60 s less): product_profile.py, where a product's time goes
#    (per kind, per convolution shape) -> profile/, profile.log.
# 6. with COMPILED=1 (up to 8 minutes more: best as a second device call): compiled_measurement.py on both models at gpu.py's
#    shapes, a monitor measurement with eager against hvp="compiled" products (the compile of
#    every variant, then a later measurement) -> compiled/, compiled.log. gpu.py's own compiled
#    rows come last and are skipped when the budget runs out.
# It writes 8 files, the most a device call brings back: add a step only by merging logs.
# In a 15-minute session (2026-11-29) a call started in about 30 s; this ran in 450 s with
#     BUDGET=380 SKIP="basis_device=None,TF32" GPU_ARGS="--no-tf32 --resnet-share 0.4" \
#       ONLY="training step,gradient over,auto,HessianMonitor defaults,reference,ours: top_eig,kind decided: top_eigenvalues(tol=1e-2),on one batch,Lightning fit" bash benchmarks/gpu_session.sh
# Each step goes on when the one before fails; `--cpu`/`--smoke` dry runs of 1 and 3 are tested
# on CPU (tests/benchmarks).
set -u
OUT=${OUT:?set OUT to the folder that comes back}
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1 \
  || echo "no PyHessian wheel in .whl/: its rows will say so"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$OUT/device.txt" 2>&1
# each step under its own limit, so that the whole fits one device call (BUDGET + 240 s)
timeout 120 python3 benchmarks/gpu_checks.py > "$OUT/checks.log" 2>&1
echo "gpu_checks exit $?" >> "$OUT/checks.log"
timeout 50 python3 -m pytest -q -p no:cacheprovider tests/curvature/test_kernels.py \
  tests/curvature/test_basis.py > "$OUT/cuda_tests.log" 2>&1
# for a short session: ONLY / SKIP (gpu.py's --only / --skip: comma-separated parts of section
# labels) and GPU_ARGS (more arguments, split at spaces: --no-tf32, --resnet-share 0.4)
# shellcheck disable=SC2086
timeout $(( ${BUDGET:-300} + 60 )) python3 benchmarks/gpu.py --budget-seconds "${BUDGET:-300}" \
  --out "$OUT" ${ONLY:+--only "$ONLY"} ${SKIP:+--skip "$SKIP"} ${GPU_ARGS:-} > "$OUT/gpu.log" 2>&1
echo "gpu.py exit $?" >> "$OUT/gpu.log"
timeout 30 python3 benchmarks/conv_ab.py --device cuda --batch 128 > "$OUT/conv_ab.log" 2>&1  # ~20 s
if [ "${PROFILE:-0}" = 1 ]; then  # where a product's time goes, per kind and convolution (~2 min)
  mkdir -p "$OUT/profile"
  timeout 240 python3 benchmarks/product_profile.py --out "$OUT/profile" > "$OUT/profile.log" 2>&1
  echo "product_profile exit $?" >> "$OUT/profile.log"
fi
if [ "${COMPILED:-0}" = 1 ]; then  # hvp="compiled" against eager, a whole measurement (rows kept as they come)
  mkdir -p "$OUT/compiled"
  for model in resnet18 gpt; do
    timeout 240 python3 benchmarks/compiled_measurement.py --model "$model" --size h200 \
      --device cuda --out "$OUT/compiled" >> "$OUT/compiled.log" 2>&1
    echo "compiled_measurement $model exit $?" >> "$OUT/compiled.log"
  done
fi
tail -n 40 "$OUT/gpu.log"
