#!/usr/bin/env bash
# Run the benchmark grid and resume what was started before: see benchmark/run_all.py --help.
set -euo pipefail
exec python "$(dirname "$0")/run_all.py" "$@"
