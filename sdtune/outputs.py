"""The output folder of a run: which files are the run's, and what must not be replaced.

A run is ``output.name`` inside ``output.dir``. Its record ``<name>.run.json``
holds its id and every file it wrote; everything else of the run is named after
it too, so several runs can share a folder (a UI's LoRA folder, say) without
touching each other's files:

    <name>.safetensors (+ .yaml, .comfyui.json) or <name>/   the result
    <name>-step<N>.safetensors ...                             step exports (pruned with checkpoint.keep_last)
    <name>.recipe.yaml, <name>.report.html, <name>.skipped.tsv
    checkpoints/<name>/step-<N>/                                resumable state
    previews/<name>/step-<N>.png, logs/<name>/

A new run never replaces another run's files silently: with ``output.overwrite:
false`` it stops and says which run is there; with ``true`` it moves the earlier
run's files aside to ``.sdtune-replaced/<name>/`` (one earlier run is kept there)
and says so. ``--resume`` continues the run the checkpoint belongs to.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdtune import atomic
from sdtune.errors import UserError

REPLACED = ".sdtune-replaced"


@dataclass
class RunRecord:
    run_id: str
    name: str
    started: str
    status: str = "running"  # running | stopped | finished
    step: int = 0
    files: list[str] = field(default_factory=list)  # relative to the output folder, in the order written


class RunFolder:
    """Where the files of the run ``name`` in ``out_dir`` go, and its record."""

    def __init__(self, out_dir: str | Path, name: str):
        self.dir, self.name = Path(out_dir), name
        self.record: RunRecord | None = None

    # -- where things go -----------------------------------------------------------------
    @property
    def stem(self) -> Path:
        return self.dir / self.name

    def step_stem(self, step: int) -> Path:
        return self.dir / f"{self.name}-step{step:06d}"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints" / self.name

    @property
    def previews(self) -> Path:
        return self.dir / "previews" / self.name

    @property
    def report(self) -> Path:
        return self.dir / f"{self.name}.report.html"

    @property
    def recipe(self) -> Path:
        return self.dir / f"{self.name}.recipe.yaml"

    @property
    def skipped(self) -> Path:
        return self.dir / f"{self.name}.skipped.tsv"

    @property
    def record_path(self) -> Path:
        return self.dir / f"{self.name}.run.json"

    # -- the record ------------------------------------------------------------------------
    def read_record(self) -> RunRecord | None:
        if not self.record_path.is_file():
            return None
        try:
            return RunRecord(**json.loads(self.record_path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise UserError(
                f"{self.record_path} (the record of run {self.name}) is damaged ({exc}); move it away or set another output.name"
            ) from None

    def _save(self) -> None:
        atomic.write_text(self.record_path, json.dumps(asdict(self.record), indent=1))

    def add(self, *paths: Path) -> None:
        """Note files this run wrote (so pruning, overwrite and moving aside know them)."""
        for path in paths:
            relative = str(Path(path).relative_to(self.dir))
            if relative not in self.record.files:
                self.record.files.append(relative)
        self._save()

    def forget(self, *paths: Path) -> None:
        relative = {str(Path(p).relative_to(self.dir)) for p in paths}
        self.record.files = [f for f in self.record.files if f not in relative]
        self._save()

    def set_status(self, status: str, step: int) -> None:
        self.record.status, self.record.step = status, step
        self._save()

    # -- starting ----------------------------------------------------------------------------
    def earlier_files(self, record: RunRecord | None) -> list[Path]:
        """The files of an earlier run of this name: those its record lists, or (a run of an
        sdtune that kept no record) the ones named after it."""
        if record is not None:
            return [self.dir / f for f in record.files if (self.dir / f).exists()] + [self.record_path]
        names = [f"{self.name}.safetensors", f"{self.name}.yaml", f"{self.name}.comfyui.json", f"{self.name}.recipe.yaml",
                 f"{self.name}.report.html", f"{self.name}.skipped.tsv"]
        found = [self.dir / n for n in names if (self.dir / n).exists()]
        found += sorted(self.dir.glob(f"{self.name}-step[0-9]*"))
        found += [p for p in (self.checkpoints, self.previews) if p.exists()]
        if (self.stem / "model_index.json").is_file():
            found.append(self.stem)
        return found

    def check(self, overwrite: bool, resume_run_id: str | None = None) -> tuple[RunRecord | None, list[Path]]:
        """Refuse, before any work, to start where another run of this name would be replaced
        without ``overwrite``, or to resume a checkpoint into another run's place. Reads only.
        ``resume_run_id``: the run a resumed checkpoint belongs to ("" for an older sdtune's)."""
        record = self.read_record()
        if resume_run_id is not None:
            if record is not None and resume_run_id and record.run_id != resume_run_id:
                raise UserError(
                    f"the checkpoint belongs to run {resume_run_id}, but {self.record_path} is run {record.run_id}; "
                    "resume it in the folder it came from, or set another output.dir / output.name"
                )
            return record, []
        earlier = self.earlier_files(record)
        if earlier and not overwrite:
            who = f"run {record.run_id} ({record.status} at step {record.step}, started {record.started})" if record else "an earlier run"
            raise UserError(
                f"{self.dir} holds {who} named {self.name!r} ({len(earlier)} files, e.g. {earlier[0].name}); "
                "continue it with --resume latest, set another output.name or output.dir, or set "
                f"output.overwrite: true to move its files aside to {self.dir / REPLACED / self.name}"
            )
        return record, earlier

    def claim(self, overwrite: bool, resume_run_id: str | None = None) -> list[str]:
        """Make this run the owner of its name in the folder (main process only): remove
        unfinished writes of dead processes, move an earlier run aside (``overwrite``), and
        write the record. Returns lines to print."""
        record, earlier = self.check(overwrite, resume_run_id)
        lines = []
        removed = atomic.remove_stale_temps(self.dir)
        if removed:
            lines.append(f"removed {len(removed)} unfinished write(s) of processes that ended: {', '.join(p.name for p in removed[:3])}")
        if resume_run_id is not None:
            self.record = record or RunRecord(resume_run_id or uuid.uuid4().hex[:12], self.name, _now())
            self.set_status("running", self.record.step)
            return lines
        if earlier:
            who = f"run {record.run_id}" if record else "an earlier run"
            lines.append(f"output.overwrite: moved the files of {who} named {self.name!r} to {self._move_aside(earlier)}")
        self.record = RunRecord(uuid.uuid4().hex[:12], self.name, _now())
        self._save()
        return lines

    def _move_aside(self, paths: list[Path]) -> Path:
        """Move ``paths`` to .sdtune-replaced/<name>/, keeping their places relative to the folder."""
        target = self.dir / REPLACED / self.name
        if target.exists():
            shutil.rmtree(target)
        for path in paths:
            destination = target / path.relative_to(self.dir)
            destination.parent.mkdir(parents=True, exist_ok=True)
            path.replace(destination)
        atomic.fsync_path(self.dir)
        return target

    # -- step exports ------------------------------------------------------------------------
    def prune_step_exports(self, keep_steps: set[int]) -> None:
        """Delete this run's step exports except those of ``keep_steps`` (the kept checkpoints')."""
        prefix = f"{self.name}-step"
        doomed = []
        for relative in self.record.files:
            head = relative.split("/", 1)[0]
            if head.startswith(prefix) and head[len(prefix) : len(prefix) + 6].isdigit():
                if int(head[len(prefix) : len(prefix) + 6]) not in keep_steps:
                    doomed.append(self.dir / head)
        for path in dict.fromkeys(doomed):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if doomed:
            self.forget(*doomed)


def written_by_sdtune(path: str | Path) -> bool:
    """A file or folder sdtune wrote: a .safetensors with sdtune's metadata, a diffusers
    folder with sdtune's marker, or a sidecar beside such a file."""
    from sdtune.export.diffusers_folder import MARKER
    from sdtune.weight_files import read_header

    path = Path(path)
    if path.is_dir():
        return (path / MARKER).is_file()
    if path.suffix == ".safetensors":
        try:
            return "sdtune.version" in read_header(path)[1]
        except UserError:
            return False
    return False


def check_replaceable(path: str | Path, overwrite: bool) -> None:
    """An export may replace an existing output only when asked to, and only one sdtune wrote."""
    path = Path(path)
    atomic.remove_stale_temps(path.parent, recursive=False)  # what a killed export left beside it
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    if not written_by_sdtune(path):
        raise UserError(
            f"{path} exists and was not written by sdtune, so --overwrite leaves it alone; "
            "remove it yourself or choose another output path"
        )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
