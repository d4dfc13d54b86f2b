#!/usr/bin/env bash
# GPU smoke check (not run by CI: CI has no GPU). On a machine with one or more GPUs and
# hetsched importable (`pip install -e .`, or PYTHONPATH=repo root), from the repository
# root:  [PYTHON=.venv/bin/python] bash .ci/gpu_smoke.sh [OUT_DIR]
# It discovers this host (`probe local`, with a matmul for TFLOPS), plans the tiny GPT on
# it, launches the example through torchrun (NCCL for CUDA tensors, gloo beside it for
# CPU ones) for 60 steps with a checkpoint, then resumes to step 80. Then it creates one
# NCCL group per network hetsched can ask for (ncclConfig_t net_name Socket, IB, and
# NCCL's default) with NCCL_DEBUG=INFO and prints NCCL's "Using network" lines for each
# (.ci/nccl_transports.py; IB is expected to be refused on a host without an HCA).
# Exit status: the first step that failed (3 discovery, 4 plan, 5 training, 6 resume,
# 7 the Socket group), else 0. Not run in the session that wrote the transport part.
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
echo "== one NCCL group per network (ncclConfig_t net_name)"
for net in Socket IB none; do
    NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET timeout 120 "$py" -m torch.distributed.run \
        --standalone --nproc-per-node 1 .ci/nccl_transports.py --net "$net" \
        > "$out/nccl-$net.log" 2>&1
    echo "-- net $net: exit $?"
    grep -E "per-communicator|net_name asked|Using network|NET/" "$out/nccl-$net.log" | head -8
done
grep -q "net_name asked: Socket;" "$out/nccl-Socket.log" || exit 7
echo "gpu smoke check passed; files in $out"
