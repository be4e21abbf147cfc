#!/usr/bin/env bash
# Set up a fresh clone: system tools for the Metal-on-CPU harness (Linux), Python dependencies, and the
# package itself (its compiled extension is built where torch has CUDA; on a Mac nothing is compiled).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = Linux ]; then
  # The harness compiles shaders/*.metal with clang 19 (half/bfloat support) and runs threadgroups as fibers.
  if ! command -v clang++-19 >/dev/null 2>&1 || [ ! -f /usr/include/boost/context/fiber.hpp ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
      echo "warning: not root and no sudo: install clang-19 and libboost-context-dev yourself;" \
           "until then the Metal-on-CPU harness tests are skipped" >&2
    else
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang-19 libboost-context-dev >/dev/null
    fi
  fi
fi

python3 -m pip install -q --disable-pip-version-check -r requirements-dev.txt
python3 -m pip install -q --disable-pip-version-check --no-build-isolation -e .
