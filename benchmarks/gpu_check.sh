#!/usr/bin/env bash
# One short GPU check, for a machine with CUDA: every task a few training steps with AMP (the pipeline's step next to a
# bare loop on the same GPU, plus inference), then precision and layout for resnet18/50 at 224 px.
#   bash benchmarks/gpu_check.sh            (from the repository root; python3 must have torch with CUDA)
# Wheels in .whl/ (pydantic, albumentations, pycocotools, ...) are installed first where the machine lacks them.
set -euo pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
python3 benchmarks/tasks_throughput.py --backbones resnet18 resnet50 resnet101 --steps 10 --rounds 2 "$@"
python3 benchmarks/precision_layout.py --backbones resnet18 resnet50 --sizes 224 --batch 64 --steps 10 --rounds 2
