#!/usr/bin/env bash
# sdtune's one entry point: set up a virtualenv, then run the demo, the tests or a recipe.
#
#   bash launch.sh                           set up, then train the tiny demo (recipes/tiny_demo.yaml)
#   bash launch.sh --set train.max_steps=50  the demo with recipe overrides
#   bash launch.sh test [PYTEST ARGS]        set up with the test extras, run the test suite
#   bash launch.sh train RECIPE [--set K=V]  set up, train any recipe through accelerate
#
# SDTUNE_VENV picks the virtualenv folder (default .venv). Without an NVIDIA GPU
# the CPU build of PyTorch is installed (torch==2.13.0) instead of the multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SDTUNE_VENV:-.venv}
PY="$VENV/bin/python"

setup() {  # setup EXTRAS: install sdtune[EXTRAS] once per pyproject.toml version
    local extras=$1 hash stamp
    if [ ! -x "$PY" ]; then
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || { echo "sdtune needs Python >= 3.10 (python3 is $(python3 --version))" >&2; exit 1; }
        python3 -m venv "$VENV"
    fi
    hash=$(sha256sum pyproject.toml | cut -c1-12)
    stamp="$VENV/.sdtune-installed-$hash-${extras:-base}"
    # Any install of this pyproject.toml has the base packages.
    if [ -f "$stamp" ] || { [ -z "$extras" ] && compgen -G "$VENV/.sdtune-installed-$hash-*" >/dev/null; }; then
        return
    fi
    "$PY" -m pip install --quiet --upgrade pip
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install --quiet torch==2.13.0
    fi
    "$PY" -m pip install --quiet -e ".${extras:+[$extras]}"
    touch "$stamp"
}

train() {  # train RECIPE [ARGS...]
    "$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no \
        --dynamo_backend no sdtune/train.py --recipe "$@"
}

case "${1:-demo}" in
    test)
        shift
        setup dev,bnb,lion,prodigy
        # One torch thread: the test models are tiny, where threads cost more than
        # they give, and a second busy process on 2 cores makes threaded torch crawl.
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        exec "$PY" -m pytest "$@"
        ;;
    train)
        shift
        [ $# -ge 1 ] || { echo "usage: bash launch.sh train RECIPE [--set key=value ...]" >&2; exit 2; }
        setup ""
        train "$@"
        ;;
    demo | --set)
        [ "${1:-}" = demo ] && shift
        setup ""
        if [ ! -f models/tiny-demo/model_index.json ]; then
            "$VENV/bin/sdtune" make-tiny models/tiny-demo --prediction v
        fi
        train recipes/tiny_demo.yaml "$@"
        ;;
    *)
        echo "usage: bash launch.sh [demo|test|train RECIPE] [--set key=value ...]" >&2
        exit 2
        ;;
esac
