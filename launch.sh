#!/usr/bin/env bash
# sdtune's one entry point: set up a virtualenv from the lock, then run the demo, the tests or a recipe.
#
#   bash launch.sh                           set up, then train the tiny demo (recipes/tiny_demo.yaml)
#   bash launch.sh --set train.max_steps=50  the demo with recipe overrides
#   bash launch.sh test [PYTEST ARGS]        set up with the test extras, run the test suite (pytest-xdist:
#                                            one worker per core, at most 4; SDTUNE_TEST_WORKERS=N to choose)
#   bash launch.sh test --latest [ARGS]      the drift check: the suite in a fresh venv of the newest
#                                            releases, and which versions differ from the lock
#   bash launch.sh train RECIPE [--processes N] [ACCELERATE FLAGS] [--set K=V] [--resume X] [--debug]
#                                            set up, train any recipe through accelerate launch: N
#                                            processes (default 1), one per GPU, or N CPU processes
#                                            where there is no GPU (no nvidia-smi, or SDTUNE_FORCE_CPU=1).
#                                            Other --flags (--config_file F, --mixed_precision M,
#                                            --main_process_port P, --machine_rank R: FLAG VALUE or
#                                            FLAG=VALUE) go to accelerate launch; docs/distributed.md.
#                                            SDTUNE_LAUNCH_DRY_RUN=1 prints the command and runs nothing.
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
    [ "$kind" = test ] && build_deepspeed_ops
    rm -f "$VENV"/.sdtune-installed-*
    touch "$stamp"
}

build_deepspeed_ops() {  # compile the DeepSpeed CPU ops the tests use, once, while nothing else runs
    # DeepSpeed builds them on first use (about 1.5 min alone on 2 cores); inside the suite,
    # beside a second test worker, that took 5 min. Built into TORCH_EXTENSIONS_DIR.
    echo "launch.sh: building DeepSpeed's CPU ops for the tests (once per lock) into $TORCH_EXTENSIONS_DIR" >&2
    DS_ACCELERATOR=cpu "$PY" -c '
from deepspeed.accelerator import get_accelerator
for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
    get_accelerator().create_op_builder(name).load(verbose=False)
' >/dev/null
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
    SDTUNE_VENV="$venv" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$py" -m pytest -n "${SDTUNE_TEST_WORKERS:-$(test_workers)}" "$@"
    rc=$?
    set -e
    cat "$venv/drift.txt"
    echo "launch.sh: the suite on the newest releases exited with $rc; after fixing what broke, \`bash launch.sh lock --upgrade\` moves the lock to them"
    return $rc
}

test_workers() {  # the test workers for this machine: the cores this process may use, at most 4
    python3 -c 'import os; print(min(4, len(os.sched_getaffinity(0))))'  # (nproc obeys OMP_NUM_THREADS)
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

train() {  # train RECIPE [--processes N] [ACCELERATE FLAGS] [--set K=V] [--resume X] [--debug]
    local recipe=$1 processes="" arg
    local -a launcher=() sdtune=() env=()
    local -A given=()  # the accelerate flags given, by name (config_file), - read as _
    shift
    while [ $# -gt 0 ]; do
        arg=$1
        shift
        case $arg in
            --processes | --num_processes | --num-processes) processes=${1:-}; [ $# -eq 0 ] || shift ;;
            --processes=* | --num_processes=* | --num-processes=*) processes=${arg#*=} ;;
            --set | --resume) sdtune+=("$arg" "${1:-}"); [ $# -eq 0 ] || shift ;;
            --set=* | --resume=* | --debug) sdtune+=("$arg") ;;
            --*)  # for accelerate launch: FLAG=VALUE, FLAG VALUE, or FLAG alone when a flag follows
                launcher+=("$arg")
                if [[ $arg != *=* ]] && [ $# -gt 0 ] && [[ $1 != --* ]]; then
                    launcher+=("$1")
                    shift
                fi
                arg=${arg%%=*}
                arg=${arg#--}
                given[${arg//-/_}]=1
                ;;
            *) echo "launch.sh: '$arg' is not a flag; usage: bash launch.sh train RECIPE [--processes N] [ACCELERATE FLAGS] [--set key=value ...]" >&2; exit 2 ;;
        esac
    done
    [[ ${processes:-1} =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: --processes wants a whole number >= 1, got '$processes'" >&2; exit 2; }
    local cmd=("$VENV/bin/accelerate" launch -q)  # -q: a failed run ends with sdtune's message, not a launcher traceback
    if [ -n "${given[config_file]-}" ]; then
        # The config file says the rest; a value on the command line would override it.
        [ -z "$processes" ] || cmd+=(--num_processes "$processes")
    else
        [ "${processes:-1}" -eq 1 ] || cmd+=(--multi_gpu)
        cmd+=(--num_processes "${processes:-1}")
        # Given, so that accelerate lists no defaults it chose; the recipe sets sdtune's precision.
        [ -n "${given[num_machines]-}" ] || cmd+=(--num_machines 1)
        [ -n "${given[mixed_precision]-}" ] || cmd+=(--mixed_precision no)
        [ -n "${given[dynamo_backend]-}" ] || cmd+=(--dynamo_backend no)
    fi
    # Several processes and no GPU: only --multi_gpu with ACCELERATE_USE_CPU=1 gives accelerate's
    # MULTI_CPU (gloo); --cpu --num_processes N runs one process, --multi_gpu alone N unconnected
    # runs. A config file may ask for several processes, so it gets the variable too.
    if { [ "${processes:-1}" -gt 1 ] || [ -n "${given[config_file]-}" ]; } && ! has_gpu; then
        env=(ACCELERATE_USE_CPU=1)
    fi
    cmd+=(${launcher[@]+"${launcher[@]}"} sdtune/train.py --recipe "$recipe" ${sdtune[@]+"${sdtune[@]}"})
    echo "sdtune: launching:$(printf ' %q' ${env[@]+"${env[@]}"} "${cmd[@]}")" >&2
    if [ "${SDTUNE_LAUNCH_DRY_RUN:-0}" = 1 ]; then
        return 0
    fi
    env ${env[@]+"${env[@]}"} "${cmd[@]}"
}

has_gpu() {  # an NVIDIA GPU, unless SDTUNE_FORCE_CPU=1
    [ "${SDTUNE_FORCE_CPU:-0}" != 1 ] && command -v nvidia-smi >/dev/null 2>&1
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
        # DeepSpeed's compiled CPU ops live with the venv they were built against.
        export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(realpath -m "$VENV/torch-extensions")}
        setup test
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        # One test worker per core (at most 4; SDTUNE_TEST_WORKERS=N to choose, 0 for none):
        # the tests run one torch thread each, so two cores run two tests at once.
        exec "$PY" -m pytest -n "${SDTUNE_TEST_WORKERS:-$(test_workers)}" "$@"
        ;;
    lock)
        shift
        lock "$@"
        ;;
    train)
        shift
        [ $# -ge 1 ] && [[ $1 != -* ]] || { echo "usage: bash launch.sh train RECIPE [--processes N] [ACCELERATE FLAGS] [--set key=value ...]" >&2; exit 2; }
        [ "${SDTUNE_LAUNCH_DRY_RUN:-0}" = 1 ] || setup run  # a dry run only prints the command
        train "$@"
        ;;
    demo | --set)
        [ "${1:-}" = demo ] && shift
        setup run
        # The demo's 64 images (the trigger word's set) are generated, not committed; the
        # base it trains on, models/tiny-base, is (docs/tiny_base.md).
        if [ ! -f datasets/world-zwx/world.json ]; then
            "$PY" datasets/make_world.py datasets/world-zwx --trigger
        fi
        train recipes/tiny_demo.yaml "$@"
        ;;
    *)
        echo "usage: bash launch.sh [demo|test [--latest]|train RECIPE [--processes N]|lock] [--set key=value ...]" >&2
        exit 2
        ;;
esac
