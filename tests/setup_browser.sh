#!/usr/bin/env bash
# What the browser test (tests/service/test_playground_browser.py) needs, installed only where missing:
# Debian's chromium and chromium-driver (apt; as root, or with passwordless sudo), and Python selenium in
# .test-deps/ (pip --target, like benchmarks/setup.sh does for PEFT: never a dependency of the project).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c "import sys; sys.path.append('.test-deps'); import selenium" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --target .test-deps selenium
fi
echo "browser test deps: $(chromium --version), $(chromedriver --version | cut -d' ' -f1-2), selenium in .test-deps"
