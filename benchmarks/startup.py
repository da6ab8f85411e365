"""Time from launch to the first finished training step, as a user launches sdtune.

    python benchmarks/startup.py                       # accelerate launch, tiny model, 5 warm runs
    python benchmarks/startup.py --launcher python     # `python -m sdtune train` instead
    python benchmarks/startup.py --python /tmp/runvenv/bin/python   # another environment (e.g. without bitsandbytes)

It builds the tiny model (``sdtune make-tiny``) in a temporary folder, runs the tiny
demo recipe for 2 steps once to fill a fresh latent/text cache (the ``cold`` run),
then ``--repeat`` more times on the filled cache (``warm``). A run's time is from
the moment the launcher process is started to the moment the trainer's progress bar
first shows a finished step (``TQDM_MININTERVAL=0``, so the bar redraws at every
step); it includes the launcher, the imports, the model load and hashing, the data
scan, the cache lookups and step 1. It also times ``import sdtune.train`` alone in
the same interpreter (``--repeat`` times). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_STEP = re.compile(rb"training: .*\| *[1-9]\d*/2 ")


def _command(python: str, launcher: str, model: Path, out: Path, cache: Path) -> list[str]:
    sets = [f"model.path={model}", f"data.cache_dir={cache}", f"output.dir={out}", "output.overwrite=true",
            "train.max_steps=2", "train.logger=none", "preview.prompts=[]", "data.validation_split=0"]
    args = ["--recipe", str(ROOT / "recipes" / "tiny_demo.yaml"), *[a for s in sets for a in ("--set", s)]]
    if launcher == "accelerate":
        return [python, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "sdtune" / "train.py"), *args]
    return [python, "-m", "sdtune", "train", *args]


def time_to_first_step(command: list[str], env: dict[str, str]) -> float:
    """Seconds from starting ``command`` to its progress bar's first finished step (the run then goes on to its end)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, first = bytearray(), None
    for chunk in iter(lambda: proc.stderr.read1(4096), b""):
        seen += chunk
        if first is None and FIRST_STEP.search(seen):
            first = time.perf_counter() - started
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(command)}\n{seen.decode(errors='replace')[-3000:]}")
    return first


def import_seconds(python: str, env: dict[str, str]) -> float:
    code = "import time; t = time.perf_counter(); import sdtune.train; print(time.perf_counter() - t)"
    return float(subprocess.run([python, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the environment to time")
    parser.add_argument("--launcher", choices=("accelerate", "python"), default="accelerate")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    env = os.environ | {"TQDM_MININTERVAL": "0", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        subprocess.run([args.python, "-m", "sdtune", "make-tiny", str(model), "--prediction-type", "v"], cwd=ROOT, env=env,
                       check=True, capture_output=True)
        command = _command(args.python, args.launcher, model, Path(tmp) / "out", Path(tmp) / "cache")
        cold = time_to_first_step(command, env)
        warm = [time_to_first_step(command, env) for _ in range(args.repeat)]
        imports = [import_seconds(args.python, env) for _ in range(args.repeat)]
    has_bnb = subprocess.run([args.python, "-c", "import importlib.util as u; print(u.find_spec('bitsandbytes') is not None)"],
                             capture_output=True, text=True).stdout.strip() == "True"
    print(json.dumps({
        "launcher": args.launcher, "python": args.python, "bitsandbytes_installed": has_bnb, "cold_first_step_s": round(cold, 2),
        "warm_first_step_s_median": round(statistics.median(warm), 2), "warm_first_step_s": [round(w, 2) for w in warm],
        "import_sdtune_train_s_median": round(statistics.median(imports), 2), "import_s": [round(i, 2) for i in imports],
        "load_average_1min": os.getloadavg()[0], "cores": len(os.sched_getaffinity(0)),
    }))


if __name__ == "__main__":
    main()
