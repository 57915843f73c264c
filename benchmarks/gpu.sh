#!/usr/bin/env bash
# The GPU benchmark: 1,000 paper-protocol iDLG attacks (CIFAR-100, LeNet, L-BFGS, 300 steps, tolerance 1e-6)
# by the engine on one CUDA device, and the faithful reference loop on the same GPU for the first 50 of them.
# Prints both sides' wall time, attacks per second (and per minute), success (MSE < 1e-3), evaluations per
# success; the last line is `speedup: X` (engine over reference, attacks per minute on the one GPU).
#
#   bash benchmarks/gpu.sh                          # on a machine with CUDA (data: ../shared/data/cifar100)
#   bash benchmarks/gpu.sh --data /path/to/cifar100 --override continuous_batching=true
#   GPU_CHECK=1 bash benchmarks/gpu.sh              # a check of this script on the CPU: 8 trials, 5 steps
#
# Further arguments go to benchmarks/paper_protocol.py (its --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ "${GPU_CHECK:-0}" = 1 ]; then
    exec "$PYTHON" benchmarks/paper_protocol.py --device cpu --cores 1 --trials 8 --reference-trials 2 --steps 5 "$@"
fi
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
    "benchmarks/gpu.sh: no CUDA device here; run it on a GPU machine (GPU_CHECK=1 checks the script on the CPU)")'
"$PYTHON" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
exec "$PYTHON" benchmarks/paper_protocol.py --device cuda --trials 1000 --reference-trials 50 "$@"
