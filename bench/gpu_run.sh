#!/usr/bin/env bash
# The GPU tests and benchmarks in one device call (no ray / optuna / anndata needed there):
#   bash bench/gpu_run.sh            # writes gpu_epoch_time.json, gpu_reference.json, population_trainer_speed_gpu.json,
#                                    # embedding_throughput.json to $OUT
# Embedding: 2,000 cell-line-like cells and two token budgets keep the call inside a few minutes.
set -u
export PYTHONUNBUFFERED=1 OUT="${OUT:-.}"
PY="${PYTHON:-python3}"
nvidia-smi -L
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
SECONDS=0
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 15 | tee "$OUT/test_gpu.log"
echo "GPU tests: ${SECONDS} s"
SECONDS=0
timeout 240 "$PY" -m bench.gpu_epoch_time 2>&1 | tee "$OUT/epoch.log"
echo "epoch benchmark + reference: ${SECONDS} s"
SECONDS=0
timeout 200 "$PY" -m bench.population_trainer_speed --device cuda --sizes research --populations 1 4 16 64 --epochs 4 \
  --out "$OUT/population_trainer_speed_gpu.json" 2>&1 | tee "$OUT/population.log"
echo "population benchmark: ${SECONDS} s"
SECONDS=0
timeout 300 "$PY" -m bench.embedding_throughput --cells 2000 --budgets 65536,131072 2>&1 | tee "$OUT/embed.log"
echo "embedding benchmark: ${SECONDS} s"
