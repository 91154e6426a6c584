#!/usr/bin/env bash
# Accelerator check of meljax: the update step's MFU (bf16, Qwen3-1.7B shapes, random weights;
# target >= 40% on an H100) and decode tokens/s at batch 256. Needs no weights and no network.
#
#   benchmarks/device_check.sh            # on a CUDA GPU (or TPU): full shapes
#   benchmarks/device_check.sh --tiny     # anywhere, tiny shapes (the test suite runs this on CPU)
#   benchmarks/device_check.sh --help     # all flags (batch, seq, micro-batches, decode batch ...)
#
# Runs the repository's meljax (PYTHONPATH), with $PYTHON or python3. The last line printed is
# a JSON object with every figure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$ROOT/benchmarks/device_check.py" "$@"
