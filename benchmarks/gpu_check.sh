#!/usr/bin/env bash
# Every GPU check of this project in one call of under ~9.5 minutes, for a session that is lent
# a CUDA machine for a short time. Logs go to $1 (default: $OUT, else ./gpu-check-out).
#
#   bash benchmarks/gpu_check.sh            # on the device machine: python3 there holds torch+triton
#   PHASE=models bash benchmarks/gpu_check.sh   # a second call (~5.5 minutes), when device time is left:
#                                               # ResNet-18 and DenseNet-121 throughput (issue 8)
#
# Each step has its own time limit, so one slow step cannot eat the others; a step that runs out
# says so in its log ("timed out") and the script goes on. Order: correctness first, then speed.
set -u
out="${1:-${OUT:-gpu-check-out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "timed out" >>"$out/$name.log"
    echo "   rc=$rc in $((SECONDS - start))s; last lines:"
    tail -n 4 "$out/$name.log" | sed 's/^/   /'
}

"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee "$out/device.log"
if [ "${PHASE:-main}" = models ]; then
    # the papers' model-level claims (bn-sampling: +16.5% ResNet-18 with BS-4/128, +21.7% DenseNet-121
    # with FS+VDN), eager and compiled, against stock in the same run
    step train-resnet18 120 "$py" benchmarks/train_step.py --models resnet18 --batch 128 --recipes bn bs:n=4 fs \
        --compile stock bs:n=4 --steps 15
    step train-densenet121 200 "$py" benchmarks/train_step.py --models densenet121 --batch 64 --recipes bn fs+vdn \
        --compile stock fs+vdn --steps 15
    echo "logs in $out"
    exit 0
fi
# the GPU-marked tests and those that run on CUDA too (limit raised: both launch sequences of every kernel case compile): kernels on CUDA, lowered models (fs+vdn on CUDA was fixed but never re-run), CUDA round trips
step gpu-tests 230 "$py" -m pytest -q -m "gpu or cuda_too" -p no:cacheprovider tests
# host vs device time of one lowered layer, at a host-bound and a device-bound shape
step kernel-overhead 40 bash -c "'$py' benchmarks/kernel_overhead.py --shape 128,256,14,14 && \
    '$py' benchmarks/kernel_overhead.py --shape 256,64,112,112"
# layer level, the issue-8 shapes at batch 256 (eager cuDNN, torch.compile, ours per recipe)
step layer-speed 110 "$py" benchmarks/bn_layer_speed.py --batches 256 --compile-batches 256
# model level: ResNet-50 training throughput, eager and compiled
# (compiled: compile_path=inductor, the default, and ops, the custom ops as before)
step train-step 150 "$py" benchmarks/train_step.py --models resnet50 --batch 128 --recipes bn fs \
    --compile stock fs --compile-paths inductor ops --steps 15
# CBN's overhead on a GPU (issue 6 measured it on a CPU only), plain torch and lowered
step cbn-overhead 40 bash -c "'$py' benchmarks/cbn_overhead.py --device cuda --steps 30 \
    --cases 'resnet18 b4 224x224' --recipes 'bn,bn+wgrad,naive-cbn,cbn,cbn:grad_stride=2' && \
    '$py' benchmarks/cbn_overhead.py --device cuda --steps 30 --lower fused \
    --cases 'resnet18 b4 224x224' --recipes 'bn,naive-cbn,cbn,cbn:grad_stride=2'"
echo "logs in $out"
