#!/usr/bin/env bash
# The tests, offline: the whole suite, then the `numerics` tests (training outcomes and float
# tolerances) twice more under other ATen CPU kernel sets, which round as other x86 CPUs do
# (avx2: Intel Xeons without AVX-512; default: no vector extensions). Arguments go to the first run.
# The two kernel-set runs go side by side, one thread each (their tests are small: on 2 cores this
# takes ~60% of running them one after the other with 2 threads, and no OpenMP spinning contends).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pytest -q "$@"
logs=$(mktemp -d)
pids=()
for capability in avx2 default; do
  ATEN_CPU_CAPABILITY=$capability OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider -m numerics \
    > "$logs/$capability.log" 2>&1 &
  pids+=($!)
done
status=0
for i in 0 1; do
  wait "${pids[$i]}" || status=1
done
for capability in avx2 default; do
  echo "numerics tests under ATEN_CPU_CAPABILITY=$capability"
  cat "$logs/$capability.log"
done
rm -rf "$logs"
exit $status
