#!/usr/bin/env bash
# `make test`: the unit and model tiers run beside the Ray tier, in a second pytest process.
# Why: the unit and model tiers keep one core busy (model tier: one torch thread by design), while the
# Ray tier leaves ~20% of both cores idle (polls, health checks, process start-ups); side by side, the
# cheap tiers and the multi-node module took 0.82 of their serial time (docs/benchmarks.md, stop 28).
# Each process has its own temp folder and the cheap tiers print their report after the Ray tier's,
# so the two outputs do not interleave. Every other folder of tests/ runs in the main process.
# Usage: tests/run_tiers.sh PYTHON [pytest args for the main process...]
set -uo pipefail
py="$1"
shift
cd "$(dirname "$0")/.."
scratch="$(mktemp -d "${TMPDIR:-/tmp}/exfm-tiers.XXXXXX")"
"$py" -m pytest -q -p no:cacheprovider --basetemp="$scratch/tmp" --durations=5 tests/unit tests/model \
  >"$scratch/cheap.log" 2>&1 &
cheap=$!
trap 'kill "$cheap" 2>/dev/null; rm -rf "$scratch"' EXIT
"$py" -m pytest -q "$@" tests --ignore=tests/unit --ignore=tests/model
ray_rc=$?
wait "$cheap"
cheap_rc=$?
echo "== tests/unit and tests/model (ran beside the Ray tier): exit $cheap_rc"
cat "$scratch/cheap.log"
exit $((ray_rc != 0 || cheap_rc != 0))
