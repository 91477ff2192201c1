#!/usr/bin/env bash
# One prepared command for a lent GPU machine, at most 8 minutes in all (every step has its own
# time limit, cut to what is left of the budget):
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu      # dry run here: every step's command line, on the CPU
# Needs no network and no ../shared: the bundled model, its sample images and the demo clip.
# The dry run runs every step, the GPU ones too, with --device cpu: those that need a GPU or
# TensorRT are expected to be refused there (exit 2, or 1 for gpu_check.py), and a step whose
# output shows a usage error (an unknown option, backend, device or precision) is never ok, so
# a typo in a command line shows here, not on the lent GPU.
# Runs what the machine has: PyTorch CUDA graphs (stream --backend torch), --backend auto,
# ONNX Runtime's GPU providers where onnxruntime-gpu is installed, TensorRT engines where
# tensorrt + polygraphy + cuda-python import; checks that a corrupted graph, and an engine
# built from it, are refused (parity exit 1) and faithful ones pass. Each step is appended to
# the results file as one JSON line the moment it ends (a timeout loses nothing): step,
# command, expected and actual exit code, seconds, the output's last lines. Stream FPS goes to
# its own JSON files.
# GPU_CHECK_DATA=DIR (a labelled image folder) adds benchmarks/gpu_check.py's comparison.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for all steps; the machine's start is not counted
SCALE=${GPU_CHECK_LIMIT_SCALE:-1}  # each step's limit times this (a busy CPU for the dry run)
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
PY=${PYTHON:-python3}
I2E=("$PY" -m i2e_deploy.cli)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
OUT=$RESULTS/gpu_check_steps_$MODE.jsonl
: > "$OUT"
WORK=$(mktemp -d)
export I2E_CACHE=${I2E_CACHE:-$WORK/cache}
START=$SECONDS
DEVICE=cuda
[ "$MODE" = cpu ] && DEVICE=cpu

# Polygraphy finds libcudart in LD_LIBRARY_PATH, /usr/local/cuda/lib64, /usr/lib, /lib and
# nvidia/cuda_runtime/lib, not in the CUDA 13 wheels' nvidia/cu13/lib: add the wheels' folders.
WHEEL_LIBS=$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site
dirs = [d for p in site.getsitepackages() for d in glob.glob(os.path.join(p, "nvidia", "*", "lib"))
        if glob.glob(os.path.join(d, "libcudart.so*"))]
print(":".join(dirs))
EOF
)
[ -n "$WHEEL_LIBS" ] && export LD_LIBRARY_PATH="$WHEEL_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

record() {  # record NAME EXPECTED EXIT SECONDS COMMAND LOGFILE: append one JSON line
  "$PY" - "$@" >> "$OUT" <<'EOF'
import json, re, sys
name, expected, code, seconds, command, log = sys.argv[1:7]
text = open(log, errors="replace").read() if log else ""
tail = text.splitlines()[-15:]
# What typer, argparse and the CLI's own checks say about a command line they refuse.
usage = re.search(r"No such option|Usage:|usage:|Invalid value|Missing (option|argument)|"
                  r"unexpected extra argument|unrecognized arguments|unknown (backend|device|"
                  r"precision|format|tolerance)", text)
print(json.dumps({"step": name, "command": command,
                  "expected_exit": None if expected == "-" else int(expected),
                  "exit": None if code == "-" else int(code), "seconds": float(seconds),
                  "timed_out": code in ("124", "137"),
                  "usage_error": usage.group(0) if usage else None,
                  "ok": code != "-" and not usage
                  and (expected == "-" or int(code) == int(expected)),
                  "output_tail": tail}))
EOF
}

step() {  # step SECONDS EXPECTED_EXIT NAME COMMAND...: run within the budget, record it
  local limit=$(($1 * SCALE)) expected=$2 name=$3; shift 3
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, the ${BUDGET}s budget is spent"
    record "$name" "$expected" - 0 "$*" ""
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local log=$WORK/step.log began=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1
  local code=$?
  tail -n 5 "$log"
  echo "== $name: exit $code (expected ${expected/-/any})"
  record "$name" "$expected" "$code" $((SECONDS - began)) "$*" "$log"
}

has() { "$PY" -c "$1" > /dev/null 2>&1; }

if [ "$MODE" = gpu ] && ! has 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check.sh: PyTorch sees no CUDA GPU here; run it on a CUDA machine, or --cpu"
  exit 2
fi

step 30 0 environment "$PY" -c "
import importlib.util, platform
import onnxruntime, torch
print('python', platform.python_version(), platform.machine())
print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')
print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())
for name in ('tensorrt', 'polygraphy', 'cuda'):
    found = importlib.util.find_spec(name) is not None
    print(name, getattr(__import__(name), '__version__', 'present') if found else 'absent')
print('LD_LIBRARY_PATH additions:', '$WHEEL_LIBS' or 'none')
from i2e_deploy.runtime.runners import provider_problem
for provider in ('TensorrtExecutionProvider', 'CUDAExecutionProvider'):
    print(provider, provider_problem(provider) or 'loads')
"

MODEL=default
ONNX=$WORK/model.onnx
BAD=$WORK/corrupt.onnx
step 90 0 "export the bundled model to ONNX (verified)" "${I2E[@]}" export $MODEL -o "$ONNX"
step 20 0 "corrupt the stem conv's weight (x1.5)" "$PY" -c "
import sys; sys.path.insert(0, 'tests')
from runtime_models import corrupt
corrupt(sys.argv[1], sys.argv[2], 'Conv', 0, 1.5)  # the stem conv" "$ONNX" "$BAD"
step 15 0 "info reads the ONNX graph" "${I2E[@]}" info "$ONNX"
# ONNX Runtime runs the graph on the GPU only where onnxruntime-gpu's CUDA provider loads.
ORT_DEVICE=$DEVICE
if [ "$MODE" = gpu ] && ! has 'import sys; from i2e_deploy.targets import gpu_onnxruntime; sys.exit(gpu_onnxruntime() is not None)'; then
  ORT_DEVICE=cpu
  echo "== ONNX Runtime GPU: onnxruntime-gpu missing or its CUDA provider does not load; parity on the CPU"
fi
step 45 0 "parity: faithful graph on $ORT_DEVICE" "${I2E[@]}" parity $MODEL "$ONNX" --device $ORT_DEVICE --json "$RESULTS/gpu_check_parity_$MODE.json"
step 45 1 "parity: corrupted graph refused on $ORT_DEVICE" "${I2E[@]}" parity $MODEL "$BAD" --device $ORT_DEVICE

# The GPU steps; the dry run runs them on the CPU (one that needs a GPU is refused: exit 2).
GPU_ONLY=0
[ "$MODE" = cpu ] && GPU_ONLY=2
FRAMES=()
[ "$MODE" = cpu ] && FRAMES=(--max-frames 8)  # the dry run checks command lines, not speed
# PyTorch on CUDA: CUDA graphs by default for the torch backend (TF32 off).
step 60 0 "stream: PyTorch CUDA graphs" "${I2E[@]}" stream $MODEL --source demo --device $DEVICE --backend torch --output none "${FRAMES[@]}" --json "$RESULTS/gpu_stream_torch_$MODE.json"
if [ "$ORT_DEVICE" = "$DEVICE" ]; then
  step 60 0 "stream: ONNX Runtime GPU (verified on first use)" "${I2E[@]}" stream "$ONNX" --source demo --device $DEVICE --backend onnx --output none "${FRAMES[@]}" --json "$RESULTS/gpu_stream_ort_$MODE.json"
else
  echo "== ONNX Runtime GPU: onnxruntime-gpu missing or its CUDA provider does not load; skipped"
fi
if [ "$MODE" = cpu ] || has 'import tensorrt, polygraphy, cuda.bindings'; then
  ENGINE=$WORK/model.fp16.engine
  # Engines are built and run on a GPU: on the CPU, TensorRT's absence refuses these.
  step 120 $GPU_ONLY "TensorRT: build an FP16 engine (verified before it is written)" "${I2E[@]}" build "$ONNX" --half -o "$ENGINE" --timing-cache "$WORK/timing.cache"
  step 45 $GPU_ONLY "TensorRT: parity of the engine" "${I2E[@]}" parity $MODEL "$ENGINE" --device cuda --precision fp16
  step 15 $GPU_ONLY "TensorRT: info reads the engine and its sidecar" "${I2E[@]}" info "$ENGINE"
  # An engine of the corrupted graph (unverified on purpose) must fail parity.
  step 120 $GPU_ONLY "TensorRT: build the corrupted graph, --no-verify" "${I2E[@]}" build "$BAD" --half --no-verify -o "$WORK/corrupt.engine" --timing-cache "$WORK/timing.cache"
  CORRUPT_EXIT=1
  [ "$MODE" = cpu ] && CORRUPT_EXIT=2
  step 45 $CORRUPT_EXIT "TensorRT: corrupted engine refused by parity" "${I2E[@]}" parity $MODEL "$WORK/corrupt.engine" --device cuda --precision fp16
else
  echo "== TensorRT: tensorrt, polygraphy or cuda-python not installed; skipped"
fi
# Needs a labelled image folder (DIR/<class>/*.png); the dry run checks the command line (the
# script refuses to run without a CUDA GPU: exit 1).
if [ -n "${GPU_CHECK_DATA:-}" ] || [ "$MODE" = cpu ]; then
  CHECK_EXIT=0
  [ "$MODE" = cpu ] && CHECK_EXIT=1
  step 120 $CHECK_EXIT "eager CUDA PyTorch and CUDA graphs vs the CPU reference" "$PY" benchmarks/gpu_check.py --model $MODEL --data "${GPU_CHECK_DATA:-$WORK}" --onnx "$ONNX" --limit 500 --json "$RESULTS/gpu_check_$MODE.json"
fi
# The fastest verified runner here, with the reason on its first line.
step 90 0 "stream: --backend auto on $DEVICE" "${I2E[@]}" stream $MODEL --source demo --device $DEVICE --backend auto --output none "${FRAMES[@]}" --json "$RESULTS/gpu_stream_auto_$MODE.json"
echo "results: $OUT ($((SECONDS - START)) s)"
rm -rf "$WORK"
