# Sourced by benchmarks/gpu_check.sh and gpu_fsdp.sh on a lent GPU machine, with $OUT and $LOG
# set: the output from here on also into $OUT/$LOG, the wheels of .whl/ (benchmarks/gpu_wheels.sh)
# on the path, $PY, and what the run has to work with.
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$LOG") 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sdtune-site .whl/*.whl \
        || { echo "$0: installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/sdtune-site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PY" - <<'PY' || { echo "$0: sdtune cannot be imported here; see above"; exit 1; }
import accelerate, diffusers, peft, torch, transformers
import sdtune.train  # noqa: F401  (the checkout, from the working directory)
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)
PY
