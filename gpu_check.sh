#!/usr/bin/env bash
# The GPU check, on a machine with one CUDA GPU (about 5 minutes on one H100; allow 8):
#
#     bash gpu_check.sh            # PYTHON=/path/to/python bash gpu_check.sh for another interpreter
#
# It runs test_gpu.py (section 7's fused op against sections 1-2 on CUDA in float32 and under bf16 autocast, the
# real script with --amp, nccl and torchrun) and the benchmark on CUDA in its quick mode (float32, then bf16
# autocast), and writes the figures to gpu_check/: nvidia-smi.txt, versions.txt, pytest.txt, bench.txt and
# bench.json (bench_amp.txt, bench_amp.json). Exit 0 only if every test passed and both benchmarks ran;
# without a GPU it refuses in one line, exit 2.
set -euo pipefail
cd "$(dirname "$0")"
py="${PYTHON:-python}"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to $py (no torch, or torch.cuda.is_available() is false); run it on a GPU machine" >&2
    exit 2
fi
out=gpu_check
rm -rf "$out"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$out/nvidia-smi.txt"
"$py" -c "import sys, torch, torchvision; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'nccl', torch.cuda.nccl.version()); print('device', torch.cuda.get_device_name(0), 'count', torch.cuda.device_count())" | tee "$out/versions.txt"
status=0
# every test, even after a failure; the exit status is pytest's
timeout 420 "$py" -m pytest -q -rs test_gpu.py 2>&1 | tee "$out/pytest.txt" || status=$?
if ! grep -qE "[0-9]+ passed" "$out/pytest.txt"; then
    echo "gpu_check.sh: no GPU test passed (all skipped?)" >&2
    status=1
fi
for amp in "" "--amp"; do
    name="bench${amp:+_amp}"
    if timeout 150 "$py" bench_metamix.py --device cuda --quick --json $amp > "$out/$name.txt" 2> "$out/$name.err"; then
        tail -n 1 "$out/$name.txt" > "$out/$name.json"
        sed '$d' "$out/$name.txt"
    else
        echo "gpu_check.sh: bench_metamix.py --device cuda --quick $amp failed (see $out/$name.err)" >&2
        status=1
    fi
done
echo "gpu_check.sh: exit $status; figures in $out/"
exit "$status"
