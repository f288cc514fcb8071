#!/usr/bin/env bash
# The tests, offline: the whole suite, and beside it the `numerics` tests (training outcomes and
# float tolerances) again under the other ATen CPU kernel sets, which round as other x86 CPUs do
# (avx2: Intel Xeons without AVX-512; default: no vector extensions); the kernel set this CPU
# already runs is not run twice. Arguments go to the suite's run.
# Every pytest process has one thread: the suite runs on every core (pytest-xdist, a file's tests
# on one worker so its fixtures are built once) and the kernel-set runs share the cores with it.
# The tests are small: one thread each, no OpenMP threads spin against each other, and the
# kernel-set runs fill the cores the suite's last files leave idle.
set -euo pipefail
cd "$(dirname "$0")/.."
# The cores this process may use (not `nproc`, which reports OMP_NUM_THREADS when it is set).
cores=$(python3 -c "import os; print(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())")
native=$(python3 -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
logs=$(mktemp -d)
capabilities=()
pids=()
for capability in avx2 default; do
  [[ $capability == "$native" ]] && continue
  ATEN_CPU_CAPABILITY=$capability python3 -m pytest -q -p no:cacheprovider -m numerics \
    > "$logs/$capability.log" 2>&1 &
  capabilities+=("$capability")
  pids+=($!)
done
status=0
python3 -m pytest -q -n "$cores" --dist loadfile "$@" || status=1
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || status=1
  echo "numerics tests under ATEN_CPU_CAPABILITY=${capabilities[$i]} (this CPU's own: $native)"
  cat "$logs/${capabilities[$i]}.log"
done
rm -rf "$logs"
exit $status
