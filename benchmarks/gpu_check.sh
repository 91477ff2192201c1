#!/usr/bin/env bash
# One command for the first CUDA machine (about 5 minutes, plus about 5 with TensorRT; each step
# has its own time limit):
#   bash benchmarks/gpu_check.sh [MODEL] [IMAGE_FOLDER]
# MODEL: a checkpoint (default: the bundled model); IMAGE_FOLDER: labelled images, e.g. the
# CIFAR-10 training folder (default: ../shared/data/cifar10-train.tar.gz, extracted).
# Checks the CUDA PyTorch paths against the CPU reference (predictions, speed), the training
# step's speed on the GPU, the streaming loop on CUDA, the GPU-marked tests, and, where
# TensorRT is installed, engines through Polygraphy. Results go to benchmarks/results/ (gpu_*).
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-default}
DATA=${2:-}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check.log
: > "$LOG"
PY=${PYTHON:-python3}
I2E="$PY -m i2e_deploy.cli"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

$PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null \
  || { echo "gpu_check.sh: PyTorch sees no CUDA GPU here; run it on a CUDA machine"; exit 2; }

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log, never stop the script
  local limit=$1 name=$2; shift 2
  echo "== $name" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

if [ -z "$DATA" ]; then
  DATA=$(mktemp -d)/cifar10
  mkdir -p "$DATA"
  tar xzf ../shared/data/cifar10-train.tar.gz -C "$DATA" || { echo "no image folder"; exit 2; }
  DATA=$DATA/train
fi

step 30 environment bash -c "nvidia-smi -L; $PY -c 'import torch, onnxruntime; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name()); print(\"onnxruntime\", onnxruntime.__version__, onnxruntime.get_available_providers())'; $PY -c 'import tensorrt; print(\"tensorrt\", tensorrt.__version__)' || echo 'tensorrt: not installed'"
ONNX=$(mktemp -d)/model.onnx
step 180 "export (ONNX, verified on real images)" $I2E export "$MODEL" -o "$ONNX" --data "$DATA"
step 300 "CUDA PyTorch vs CPU reference" $PY benchmarks/gpu_check.py --model "$MODEL" --data "$DATA" --onnx "$ONNX" --limit 1000 --compile --json "$RESULTS/gpu_check.json"
step 240 "training step speed on CUDA" $PY benchmarks/train_speed.py --device cuda --imgsz 64 --batch 256 --rounds 5 --steps 10
step 120 "stream on CUDA" $I2E stream "$MODEL" --source demo --device cuda --backend torch --output none --json "$RESULTS/gpu_stream.json"
# TensorRT (through Polygraphy; needs tensorrt, polygraphy and cuda-python): FP32/FP16/INT8
# engines of the bundled model and of a 128 px MS-ResNet-18 (random weights with firing
# neurons), each row's predictions against the PyTorch reference, latency and throughput; then
# what each engine's sidecar says was built (precision per layer type, typing, profile).
if $PY -c 'import tensorrt, polygraphy, cuda.bindings' 2>/dev/null; then
  TRT_CACHE=$(mktemp -d)
  R18=$(mktemp -d)/msresnet18_128px.pt
  step 200 "TensorRT: bundled model, every backend x precision" $I2E benchmark "$MODEL" --device cuda --data "$DATA" --limit 500 --iters 30 --cache "$TRT_CACHE" --json "$RESULTS/gpu_tensorrt.json" --markdown "$RESULTS/gpu_tensorrt.md"
  step 30 "MS-ResNet-18 @128 stand-in" $PY -c "import sys; sys.path.insert(0, 'benchmarks'); from int8 import firing_model; from i2e_deploy import ModelCard, save_checkpoint; card = ModelCard(imgsz=128, resize=128); save_checkpoint(sys.argv[1], firing_model(card), card)" "$R18"
  step 200 "TensorRT: MS-ResNet-18 @128, every backend x precision" $I2E benchmark "$R18" --device cuda --iters 20 --cache "$TRT_CACHE" --json "$RESULTS/gpu_tensorrt_r18_128.json" --markdown "$RESULTS/gpu_tensorrt_r18_128.md"
  step 20 "TensorRT: what the engines' sidecars record" $PY -c "import glob, json, sys; [print(p, json.dumps({k: json.load(open(p)).get(k) for k in ('precision', 'build', 'profile', 'layers')})) for p in sorted(glob.glob(sys.argv[1] + '/*.engine.json'))]" "$TRT_CACHE"
else
  echo "== TensorRT: tensorrt, polygraphy or cuda-python not installed; engines skipped" | tee -a "$LOG"
fi
step 300 "GPU-marked tests" $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m "gpu or tensorrt" tests
echo "log: $LOG"
