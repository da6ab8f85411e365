"""The output folder of a run: what may be written there, and what must not be replaced."""

from __future__ import annotations

from pathlib import Path

from sdtune import training_state


def check_outputs(results: list[Path], out_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to start where an earlier run's results or checkpoints would be replaced,
    unless ``overwrite`` (or the run continues from its own checkpoint)."""
    if resuming or overwrite:
        return
    for path in results:
        if path.exists():
            raise FileExistsError(f"{path} exists from an earlier run; set output.overwrite=true or another output.name")
    if training_state.list_checkpoints(out_dir):
        raise FileExistsError(
            f"{training_state.checkpoint_dir(out_dir)} holds an earlier run's checkpoints; continue it with "
            "--resume latest, or set output.overwrite=true to start over"
        )
