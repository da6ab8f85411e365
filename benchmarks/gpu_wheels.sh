#!/usr/bin/env bash
# The wheels a lent GPU machine needs to run sdtune, into .whl/ (git-ignored), for benchmarks/gpu_check.sh.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12, the GPU image's Python
#
# The GPU image has a CUDA torch (2.11 when last read), numpy, pillow, safetensors, tokenizers and
# the like, but no diffusers or pydantic, and older transformers / accelerate / huggingface-hub
# than requirements/run.lock. Nothing can be fetched there, so the packages below come from here,
# at the lock's versions, without their dependencies (the image has the rest). gpu_check.sh
# installs them over the image's with `pip install --no-deps --target` and puts them first on
# PYTHONPATH. torch stays the image's. About 38 MB, within what the device tool carries.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
lock=requirements/run.lock
names=(diffusers transformers huggingface-hub peft accelerate pydantic pydantic-core annotated-types typing-inspection
       httpx2 httpcore2 h11 anyio idna truststore kernels tomlkit lazy-importer importlib-metadata zipp typing-extensions
       click regex hf-xet tokenizers hjson msgpack ninja py-cpuinfo einops)
pins=()
for name in "${names[@]}"; do
    pin=$(grep -iE "^${name}==" "$lock" requirements/test.lock | head -1 | cut -d: -f2 | cut -d' ' -f1)
    [ -n "$pin" ] || { echo "gpu_wheels.sh: $name is not in the locks" >&2; exit 1; }
    pins+=("$pin")
done
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
# DeepSpeed (gpu_fsdp.sh) comes as source only; its wheel is pure Python (its ops build on first use).
deepspeed=$(grep -E "^deepspeed==" requirements/test.lock | cut -d' ' -f1)
python3 -m pip wheel --quiet --no-deps -w .whl "$deepspeed"
echo "gpu_wheels.sh: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), in .whl/"
