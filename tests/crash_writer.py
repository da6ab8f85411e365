"""Writes checkpoints and exports in a loop until it is killed (tests/test_reliability.py).

    python tests/crash_writer.py OUT_DIR

Each round writes, through sdtune's own writers, a checkpoint (an engine file, then
``save_checkpoint``, keep_last 2), a result file (``atomic.save_safetensors``) and a folder export
(``atomic.publish_folder``), every tensor filled with the round number, so a reader
can tell a whole write from a torn one. It continues after the newest checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from sdtune import atomic, training_state

RUN_ID = "crashtest"


def main() -> None:
    out = Path(sys.argv[1])
    root = out / "checkpoints" / "run"
    found = training_state.list_checkpoints(root)
    step = json.loads((found[-1] / "position.json").read_text())["step"] if found else 0
    while True:
        step += 1
        value = float(step)
        weights = {"w": torch.full((512, 512), value), "b": torch.full((512,), value)}
        # As in training: the engine's state goes into the temp folder first, then sdtune's files.
        position = training_state.Position(step, 0, 0, step, RUN_ID)
        engine = atomic.tmp_beside(root / f"{training_state.PREFIX}{step:08d}")
        engine.mkdir(parents=True)
        torch.save({"state": {0: {"exp_avg": torch.full((512, 512), value)}}}, engine / "optimizer.bin")
        training_state.save_checkpoint(root, position, weights, "{}", keep_last=2, history={"loss": [[step, value]]}, tmp=engine)
        atomic.save_safetensors(weights, out / "result.safetensors", {"step": str(step)})
        tmp = atomic.tmp_beside(out / "folder")
        tmp.mkdir(parents=True)
        for name in ("unet", "vae", "text_encoder"):
            atomic.save_safetensors(weights, tmp / name / "model.safetensors", {"step": str(step)})
        atomic.publish_folder(tmp, out / "folder")
        print(step, flush=True)


if __name__ == "__main__":
    main()
