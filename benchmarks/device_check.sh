#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/device_check.py): paper-profile UNIT and DRN rates in
# bf16 with their MFU, and a 2-minute UNIT training through Ray Train, as a markdown table under
# $OUT (default ./device_check_out). Bounded to 8 minutes. It installs nothing: it runs with the
# project's .venv where there is one, else with the machine's python3.
#
#   benchmarks/device_check.sh            # on a machine with one GPU
#   benchmarks/device_check.sh --dry-run  # the same code on the CPU at toy sizes
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-device_check_out}"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" benchmarks/device_check.py --out "$OUT" "$@"
