#!/usr/bin/env bash
# `xfer tune` on the lent GPU machine in one device call (issue 15; BENCHMARKS.md, "`xfer tune` on one GPU").
# That machine has torch, transformers, numpy, scipy, pandas, pyarrow, scikit-learn, ... but no
# Ray or Optuna and no network: bench/pack_deps.py packs what is missing (bench/_deps/deps.tar.xz,
# git-ignored, built for its Python 3.12) and this script unpacks it onto PYTHONPATH.
#   device tool: carry ["bench/_deps"], command "bash bench/gpu_sweep.sh", timeout_s 600
#   two parts (pack_deps.py split it): carry ["bench/_deps/deps.part1.tar.xz"] with the same command
#     (unpacks, exits 3), then at once, while the machine is warm, ["bench/_deps/deps.part2.tar.xz"]
#   here, no GPU: python -m bench.pack_deps --python-version 3.11 --out /tmp/d/deps.tar.xz;
#     XFER_DEPS_PACK=/tmp/d XFER_GPU_SWEEP_CPU=1 OUT=/tmp/o PYTHON=venv/bin/python bash bench/gpu_sweep.sh
# Writes $OUT/gpu_sweep.json, gpu_sweep.log (every step's output), sweeps.log, smi_gpu.csv,
# smi_apps.csv; with XFER_GPU_EPOCH=1 also gpu_epoch_time.json (the device returns 8 files at most). Arguments go to
# bench/gpu_sweep.py (defaults: research-sized pair, 12 trials x 20 epochs, shares 1,plain,0.25,0.125,0.5);
# everything ends within XFER_GPU_SWEEP_DEADLINE (570) s of the start.
set -u -o pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-.}"
PY="${PYTHON:-python3}"
DEPS="${XFER_DEPS_DIR:-/tmp/xfer_deps}"      # survives between calls while the machine stays warm
PACKS="${XFER_DEPS_PACK:-bench/_deps}"
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" "$DEPS"
SECONDS=0

# 1. unpack the pack (or the parts carried so far)
shopt -s nullglob
for p in "$PACKS"/deps.tar.xz "$PACKS"/deps.part*.tar.xz; do
  [ -f "$p" ] || continue
  stamp="$DEPS/.unpacked-$(basename "$p")-$(stat -c %s "$p")"
  [ -e "$stamp" ] && continue
  [ "$(basename "$p")" = deps.tar.xz ] && rm -rf "$DEPS" && mkdir -p "$DEPS"   # a whole new pack
  if command -v xz >/dev/null; then
    xz -dc "$p" | tar -xf - -C "$DEPS"
  else
    "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2], filter='tar')" "$p" "$DEPS"
  fi || { echo "gpu_sweep: unpacking $p failed"; exit 2; }
  touch "$stamp"
done
markers=("$DEPS"/.xfer_deps_part*of*)
if [ ${#markers[@]} -eq 0 ]; then
  echo "gpu_sweep: no pack in $PACKS and none unpacked in $DEPS: build it with python -m bench.pack_deps and carry bench/_deps"
  exit 2
fi
total="${markers[0]##*of}"
if [ ${#markers[@]} -lt "$total" ]; then
  echo "gpu_sweep: ${#markers[@]} of $total parts unpacked in $DEPS (${markers[*]##*/}): call again now," \
       "carrying the next part, while the machine is warm"
  exit 3
fi
echo "gpu_sweep: deps in $DEPS ($(du -sh "$DEPS" | cut -f1)), unpacked in ${SECONDS} s"

# 2. the pack's Python must be this one; xfer's entry points (its egg-info does not travel)
"$PY" - "$DEPS" <<'EOF' || exit 2
import json, sys, tomllib
from pathlib import Path
deps = Path(sys.argv[1])
meta = json.loads((deps / "XFER_DEPS.json").read_text())
here = "%d.%d" % sys.version_info[:2]
if meta["python_version"] != here:
    sys.exit(f"gpu_sweep: the pack is for Python {meta['python_version']}, {sys.executable} is {here}: "
             f"python -m bench.pack_deps --python-version {here}")
p = tomllib.loads(Path("pyproject.toml").read_text())["project"]
d = deps / f"{p['name'].replace('-', '_')}-{p['version']}.dist-info"
d.mkdir(exist_ok=True)
(d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {p['name']}\nVersion: {p['version']}\n")
groups = {"console_scripts": p.get("scripts", {}), **p.get("entry-points", {})}
(d / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in e.items()) + "\n"
                                            for g, e in groups.items()))
EOF
export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}"

# 3. what the sweep imports, from where
"$PY" - <<'EOF' 2>&1 | tee "$OUT/gpu_sweep.log" || exit 2
import importlib.metadata as md
import sys
import optuna, ray, torch
import tune.driver, tune.trainable, xfer.cli
assert "tune" in [e.name for e in md.entry_points(group="xfer.commands")], "xfer tune is not registered"
print(f"Python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.cuda.is_available()}); "
      f"ray {ray.__version__} from {ray.__file__}; optuna {optuna.__version__}; xfer tune registered")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$OUT/gpu_sweep.log"
echo "gpu_sweep: set-up ${SECONDS} s" | tee -a "$OUT/gpu_sweep.log"

# 4. the data, prepared (steps 1-2 of gpu_sweep.py) on all CPUs but two; on those two, meanwhile, with
#    XFER_GPU_EPOCH=1: the GPU tests and the epoch benchmark with its plain-PyTorch reference
#    (bench/gpu_run.sh's first two parts; --smoke on a CPU)
WORK="${XFER_GPU_SWEEP_WORK:-/tmp/gpu_sweep_work}"
ncpu=$(nproc)
pin_prep=() pin_epoch=()
if [ "$ncpu" -ge 8 ] && command -v taskset >/dev/null; then
  pin_prep=(taskset -c "2-$((ncpu - 1))") pin_epoch=(taskset -c 0-1)
fi
"${pin_prep[@]}" "$PY" -m bench.gpu_sweep --work "$WORK" --prepare_only "$@" >"$WORK.prepare.log" 2>&1 &
prep=$!
if [ "${XFER_GPU_EPOCH:-0}" = 1 ]; then
  smoke=(); [ "${XFER_GPU_SWEEP_CPU:-0}" = 1 ] && smoke=(--smoke)
  t=$SECONDS
  timeout 150 "${pin_epoch[@]}" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 15 \
    | tee -a "$OUT/gpu_sweep.log"
  echo "gpu_sweep: GPU tests $((SECONDS - t)) s" | tee -a "$OUT/gpu_sweep.log"
  t=$SECONDS
  timeout 200 "${pin_epoch[@]}" "$PY" -m bench.gpu_epoch_time "${smoke[@]}" >>"$OUT/gpu_sweep.log" 2>&1
  echo "gpu_sweep: epoch benchmark + reference rc $? in $((SECONDS - t)) s" | tee -a "$OUT/gpu_sweep.log"
fi
wait $prep
prc=$?
tail -n 40 "$WORK.prepare.log" >>"$OUT/gpu_sweep.log"; tail -n 3 "$WORK.prepare.log"
[ $prc -eq 0 ] || { echo "gpu_sweep: preparing the data failed (rc $prc): see gpu_sweep.log"; exit 2; }

# 5. the sweeps: every step ends by the deadline (XFER_GPU_SWEEP_DEADLINE s after this script began,
#    default 570), less 25 s for the summary; a later --budget_s in the arguments wins
left=$(( ${XFER_GPU_SWEEP_DEADLINE:-570} - SECONDS ))
[ $left -gt 60 ] || { echo "gpu_sweep: only $left s left before the deadline, no sweep run"; exit 2; }
timeout "$left" "$PY" -m bench.gpu_sweep --out "$OUT" --work "$WORK" --budget_s "$((left - 25))" "$@" 2>&1 \
  | tee -a "$OUT/gpu_sweep.log"
rc=$?
echo "gpu_sweep: rc $rc, ${SECONDS} s in all" | tee -a "$OUT/gpu_sweep.log"
exit $rc
