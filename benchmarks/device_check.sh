#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/device_check.py): paper-profile UNIT and DRN rates in
# bf16 with their MFU, and a 2-minute UNIT training through Ray Train, as a markdown table under
# $OUT (default ./device_check_out). Bounded to 8 minutes. It runs with the project's .venv where
# there is one, else with the machine's python3 (a GPU image with torch): the measurements need
# only pydantic beside torch, installed from the project's own wheels when they were carried in
# .device_wheels (`make device-wheels` fetches them from the package mirror); nothing else is
# installed, and without Ray and MLflow the Ray Train row says it did not run.
#
#   benchmarks/device_check.sh            # on a machine with one GPU
#   benchmarks/device_check.sh --dry-run  # the same code on the CPU at toy sizes
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-device_check_out}"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  [ -d .device_wheels ] || { echo "pydantic is missing: carry .device_wheels (make device-wheels)"; exit 2; }
  "$PY" -m pip install --quiet --no-index --find-links .device_wheels --target "$OUT/.site" pydantic
  export PYTHONPATH="$PWD/$OUT/.site:$PYTHONPATH"
fi
exec timeout 480 "$PY" benchmarks/device_check.py --out "$OUT" "$@"
