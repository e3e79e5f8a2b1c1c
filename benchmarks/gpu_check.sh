#!/usr/bin/env bash
# One command for the first CUDA GPU specdec meets: the GPU tests (greedy equality through the torch path and the
# Triton kernel, sampling on the device), the Triton kernel's parity tests run for real (not interpreted), and the
# tree-attention benchmark. Run from the repository root in an environment where specdec and its test
# dependencies are installed with a CUDA build of torch:
#     bash benchmarks/gpu_check.sh [OUT_DIR]
# Everything it prints also lands in OUT_DIR (default gpu_check_out/): pytest.log, tree_attn.json, nvidia-smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
py="${PYTHON:-python}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$out/nvidia-smi.txt"
"$py" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device visible to torch: nothing to check"; exit 1; }
status=0
unset TRITON_INTERPRET
"$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_tree_attention_kernel.py tests/test_tree_attention_integration.py \
    2>&1 | tee "$out/pytest.log" || status=1
"$py" benchmarks/tree_attention_gpu.py --out "$out/tree_attn.json" 2>&1 | tee "$out/tree_attn.log" || status=1
echo "gpu_check: $([ $status = 0 ] && echo PASS || echo FAIL) (logs in $out/)"
exit $status
