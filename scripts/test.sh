#!/usr/bin/env bash
# The tests, offline: the whole suite, then the `numerics` tests (training outcomes and float
# tolerances) twice more under other ATen CPU kernel sets, which round as other x86 CPUs do
# (avx2: Intel Xeons without AVX-512; default: no vector extensions). Arguments go to the first run.
# Every pytest process gets one thread and there are as many as cores (pytest-xdist for the suite,
# a file's tests on one worker so its fixtures are built once; the two kernel-set runs side by
# side): the tests are small, and on 2 cores this takes ~75% of one 2-thread process, with no
# OpenMP threads spinning against each other.
set -euo pipefail
cd "$(dirname "$0")/.."
# The cores this process may use (not `nproc`, which reports OMP_NUM_THREADS when it is set).
cores=$(python3 -c "import os; print(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
python3 -m pytest -q -n "$cores" --dist loadfile "$@"
logs=$(mktemp -d)
pids=()
for capability in avx2 default; do
  ATEN_CPU_CAPABILITY=$capability python3 -m pytest -q -p no:cacheprovider -m numerics \
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
