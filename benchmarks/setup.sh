#!/usr/bin/env bash
# Install the benchmark-only packages (benchmarks/requirements.txt: HuggingFace PEFT, the peer of peft_bench.py)
# into .bench-deps/ with the project's Python, without their dependencies: they are the project's own (torch,
# transformers, ...), so no second torch can come in. The benchmark scripts put .bench-deps on sys.path; PEFT never
# becomes a dependency of the project.
#   bash benchmarks/setup.sh            # uses .venv/bin/python (make install creates it)
#   PYTHON=python3 bash benchmarks/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null; then
    echo "no $PYTHON: run 'make install' first (or set PYTHON)" >&2
    exit 2
fi
"$PYTHON" -m pip install --quiet --no-deps --upgrade --target .bench-deps -r benchmarks/requirements.txt
# check: PEFT imports against the project's torch and transformers, and nothing else was installed
"$PYTHON" - <<'PY'
import sys
from pathlib import Path

sys.path.append(str(Path(".bench-deps").resolve()))
import peft
import torch
import transformers

assert not Path(".bench-deps/torch").exists(), "a second torch was installed into .bench-deps"
print(f"PEFT {peft.__version__} in .bench-deps (torch {torch.__version__}, transformers {transformers.__version__} "
      f"from the project's environment)")
PY
