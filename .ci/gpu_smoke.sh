#!/usr/bin/env bash
# GPU smoke check (not run by CI: CI has no GPU). On a machine with one or more GPUs and
# hetsched importable (`pip install -e .`, or PYTHONPATH=repo root), from the repository
# root:  [PYTHON=.venv/bin/python] bash .ci/gpu_smoke.sh [OUT_DIR]
# It discovers this host (`probe local`, with a matmul for TFLOPS), plans the tiny GPT on
# it, launches the example through torchrun (NCCL for CUDA tensors, gloo beside it for
# CPU ones) for 60 steps with a checkpoint, then resumes to step 80. Exit status: the
# first step that failed (3 discovery, 4 plan, 5 training, 6 resume), else 0.
set -uo pipefail
out="${1:-${OUT:-/tmp/hetsched-gpu-smoke}}"
mkdir -p "$out"
ckpt="$out/checkpoints"
rm -rf "$ckpt"
py="${PYTHON:-python3}"
hetsched=("$py" -m cli)
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPU(s)')"
echo "== probe local"
timeout 120 "${hetsched[@]}" probe local -o "$out/topology.yaml" --name gpuhost --site here || exit 3
echo "== plan"
timeout 120 "${hetsched[@]}" plan "$out/topology.yaml" -m tiny-gpt -o "$out/plan.yaml" || exit 4
train=(examples/train_tinygpt.py --log-every 20 --checkpoint-dir "$ckpt" --checkpoint-every 30)
echo "== train 60 steps"
timeout 300 "${hetsched[@]}" launch "$out/plan.yaml" --via local -- "${train[@]}" --steps 60 \
    --metrics "$out/metrics.json" 2>&1 | tee "$out/train.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 5
echo "== resume to step 80"
timeout 300 "${hetsched[@]}" launch "$out/plan.yaml" --via local -- "${train[@]}" --steps 80 \
    2>&1 | tee "$out/resume.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 6
grep -q "resumed from step 60" "$out/resume.log" || { echo "did not resume from step 60"; exit 6; }
echo "gpu smoke check passed; files in $out"
