#!/usr/bin/env bash
# The tests, offline: the whole suite, then the `numerics` tests (training outcomes and float
# tolerances) twice more under other ATen CPU kernel sets, which round as other x86 CPUs do
# (avx2: Intel Xeons without AVX-512; default: no vector extensions). Arguments go to the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pytest -q "$@"
for capability in avx2 default; do
  echo "numerics tests under ATEN_CPU_CAPABILITY=$capability"
  ATEN_CPU_CAPABILITY=$capability python3 -m pytest -q -m numerics
done
