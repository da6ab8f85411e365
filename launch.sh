#!/usr/bin/env bash
# sdtune's one entry point: set up a virtualenv from the lock, then run the demo, the tests or a recipe.
#
#   bash launch.sh                           set up, then train the tiny demo (recipes/tiny_demo.yaml)
#   bash launch.sh --set train.max_steps=50  the demo with recipe overrides
#   bash launch.sh test [PYTEST ARGS]        set up with the test extras, run the test suite
#   bash launch.sh test --latest [ARGS]      the drift check: the suite in a fresh venv of the newest
#                                            releases, and which versions differ from the lock
#   bash launch.sh train RECIPE [--set K=V]  set up, train any recipe through accelerate
#   bash launch.sh lock [--upgrade]          regenerate requirements/*.lock (uv pip compile)
#
# Installs come from requirements/run.lock (demo, train) and requirements/test.lock
# (tests): every package at the version CI passed with, torch included. The lock
# carries the CPU build of torch; with an NVIDIA GPU (nvidia-smi) the CUDA build
# of the same release is installed instead. SDTUNE_VENV picks the virtualenv
# folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SDTUNE_VENV:-.venv}
PY="$VENV/bin/python"
LOCK_PYTHON=3.11           # the Python the locks are resolved for (CI's)
UV_VERSION=0.13.9          # the resolver that writes the locks

make_venv() {  # make_venv DIR
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "sdtune needs Python >= 3.10 (python3 is $(python3 --version))" >&2; exit 1; }
    python3 -m venv "$1"
}

locked_requirements() {  # locked_requirements LOCK: the lock as pip should install it on this machine
    if command -v nvidia-smi >/dev/null 2>&1; then
        sed -E 's/^(torch==[^+ ]+)\+cpu/\1/' "$1"  # the CUDA build of the locked release
        return
    fi
    # The CPU build: from the local wheels where pip is pointed at them (this
    # project's machines), else from PyTorch's own index (PyPI has no +cpu builds).
    local torch dir found=""
    torch=$(sed -nE 's/^torch==([^ ]+).*/\1/p' "$1")
    for dir in ${PIP_FIND_LINKS:-}; do
        compgen -G "$dir/torch-$torch-*.whl" >/dev/null && found=1
    done
    [ -n "$found" ] || echo "--extra-index-url https://download.pytorch.org/whl/cpu"
    cat "$1"
}

setup() {  # setup run|test: install requirements/<kind>.lock, then sdtune itself, once per lock
    local kind=$1 hash stamp reqs
    [ -x "$PY" ] || make_venv "$VENV"
    [ -f "$VENV/.sdtune-unlocked" ] && return  # the drift check's venv: newest releases, not the lock
    hash=$(cat pyproject.toml requirements/*.lock | sha256sum | cut -c1-12)
    stamp="$VENV/.sdtune-installed-$hash-$kind"
    # The test lock holds everything the run lock does, at the same versions.
    if [ -f "$stamp" ] || { [ "$kind" = run ] && [ -f "$VENV/.sdtune-installed-$hash-test" ]; }; then
        return
    fi
    local python
    python=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$python" = "$LOCK_PYTHON" ] || echo "launch.sh: the lock was resolved for Python $LOCK_PYTHON; this venv has $python, so some pins may not install" >&2
    reqs="$VENV/.locked-$kind.txt"
    locked_requirements "requirements/$kind.lock" >"$reqs"
    "$PY" -m pip install --quiet -r "$reqs"
    # sdtune itself, against what the lock installed (no resolving, no newer build backend).
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
    rm -f "$VENV"/.sdtune-installed-*
    touch "$stamp"
}

latest() {  # latest [PYTEST ARGS]: the suite on the newest releases, in a venv of its own
    local venv="${VENV%/}-latest" hold=(torch) py rc
    [ "${SDTUNE_LATEST_TORCH:-0}" = 1 ] && hold=()
    rm -rf "$venv"
    make_venv "$venv"
    py="$venv/bin/python"
    touch "$venv/.sdtune-unlocked"
    "$py" -m pip install --quiet --upgrade pip setuptools
    # A newer torch is a multi-GB CUDA download on a CPU machine: held at the lock's
    # release unless SDTUNE_LATEST_TORCH=1 (its newest release is still reported).
    : >"$venv/hold.txt"
    if [ ${#hold[@]} -gt 0 ]; then
        locked_requirements requirements/test.lock | grep -E '^torch==' >"$venv/hold.txt"
    fi
    [ -s "$venv/hold.txt" ] && "$py" -m pip install --quiet -r "$venv/hold.txt"
    "$py" -m pip install --quiet --no-deps --no-build-isolation -e .
    mapfile -t names < <("$py" requirements/drift.py names dev --hold "${hold[@]}")
    "$py" -m pip install --quiet --upgrade --upgrade-strategy eager -c "$venv/hold.txt" "${names[@]}"
    "$py" requirements/drift.py report requirements/test.lock --newest "${hold[@]}" | tee "$venv/drift.txt"
    set +e
    SDTUNE_VENV="$venv" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$py" -m pytest "$@"
    rc=$?
    set -e
    cat "$venv/drift.txt"
    echo "launch.sh: the suite on the newest releases exited with $rc; after fixing what broke, \`bash launch.sh lock --upgrade\` moves the lock to them"
    return $rc
}

lock() {  # lock [UV ARGS]: resolve pyproject.toml + requirements/pins.in into both locks
    local tools=${SDTUNE_LOCK_VENV:-.venv-lock}
    if [ ! -x "$tools/bin/uv" ] || [ "$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
        [ -x "$tools/bin/python" ] || make_venv "$tools"
        "$tools/bin/python" -m pip install --quiet "uv==$UV_VERSION"
    fi
    local common=(--python-version "$LOCK_PYTHON" --python-platform x86_64-manylinux_2_28
                  --custom-compile-command "bash launch.sh lock" --quiet)
    # Where pip finds the CPU torch wheel (this project's machines: /opt/wheels).
    [ -n "${PIP_FIND_LINKS:-}" ] && common+=(--find-links "$PIP_FIND_LINKS")
    # Existing pins are kept unless --upgrade / --upgrade-package NAME is given.
    "$tools/bin/uv" pip compile pyproject.toml requirements/pins.in --extra dev "${common[@]}" "$@" -o requirements/test.lock
    "$tools/bin/uv" pip compile pyproject.toml requirements/pins.in -c requirements/test.lock "${common[@]}" -o requirements/run.lock
    echo "launch.sh: wrote requirements/test.lock and requirements/run.lock; run \`bash launch.sh test\` before committing them"
}

train() {  # train RECIPE [ARGS...]
    # -q: a failed run ends with sdtune's own message, not also a traceback of accelerate's launcher.
    "$VENV/bin/accelerate" launch -q --num_processes 1 --num_machines 1 --mixed_precision no \
        --dynamo_backend no sdtune/train.py --recipe "$@"
}

case "${1:-demo}" in
    test)
        shift
        # One torch thread: the test models are tiny, where threads cost more than
        # they give, and a second busy process on 2 cores makes threaded torch crawl.
        if [ "${1:-}" = --latest ]; then
            shift
            latest "$@"
            exit $?
        fi
        setup test
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        exec "$PY" -m pytest "$@"
        ;;
    lock)
        shift
        lock "$@"
        ;;
    train)
        shift
        [ $# -ge 1 ] || { echo "usage: bash launch.sh train RECIPE [--set key=value ...]" >&2; exit 2; }
        setup run
        train "$@"
        ;;
    demo | --set)
        [ "${1:-}" = demo ] && shift
        setup run
        if [ ! -f models/tiny-demo/model_index.json ]; then
            "$VENV/bin/sdtune" make-tiny models/tiny-demo --prediction-type v
        fi
        train recipes/tiny_demo.yaml "$@"
        ;;
    *)
        echo "usage: bash launch.sh [demo|test [--latest]|train RECIPE|lock] [--set key=value ...]" >&2
        exit 2
        ;;
esac
