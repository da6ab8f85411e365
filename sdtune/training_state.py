"""Training checkpoints that resume exactly, on one process or many.

A checkpoint is a folder ``<output.dir>/checkpoints/<output.name>/step-<N>/``
holding what the next step depends on. accelerate's state machinery writes the
engine's part: optimizer (``optimizer.bin``), lr schedule, grad scaler and every
process's RNG (``random_states_<rank>.pkl``). sdtune adds the trainable weights
(``trainable.safetensors``: a LoRA checkpoint is megabytes, not the whole UNet),
the EMA weights
(``ema.pt``), where in the data order the run was and which run it belongs to
(``position.json``), the recipe, and the history so far (for report.html).
Under FSDP the weights, optimizer state and EMA weights are sharded: each process
writes its slices of the weights that train and of their optimizer state
(``fsdp_trained/``, torch's distributed checkpoint format: a LoRA's alone, as
accelerate's FSDP save would write the whole UNet's) and of the EMA weights
(``ema_<rank>.pt``), and accelerate's state machinery the rest; there is no
``trainable.safetensors``. Under DeepSpeed
(``sdtune.zero``) the engine writes the trained weights (ZeRO-1/2: once, in
``pytorch_model/mp_rank_00_model_states.pt``; ZeRO-3: each process its partition;
a LoRA's alone) and each process's optimizer partition
(``pytorch_model/zero_pp_rank_<rank>_*``); sdtune adds the EMA weights and its own
files, and there is no ``trainable.safetensors`` either.
Resuming continues the same trajectory, bit for bit on CPU: a run interrupted
at step N and resumed ends with the weights of an uninterrupted one.

A checkpoint appears whole or not at all: every process writes into one temp
folder, which the main process flushes and renames once all are done; pruning
(``checkpoint.keep_last``) touches only the checkpoints of the run that writes.
Nothing is unpickled: the ``.pt``/``.bin``/``.pkl`` files hold only tensors and
plain containers and are read with ``torch.load(weights_only=True)`` (accelerate
does so too; DeepSpeed's are read so too, with its record types allowed), which
refuses anything else; the ``.metadata`` pickles of FSDP's folders are checked to
hold only torch's checkpoint metadata types before torch reads them.
"""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate.checkpointing import load_accelerator_state, save_accelerator_state
from accelerate.utils import MODEL_NAME, broadcast_object_list
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdtune import atomic
from sdtune.errors import RecipeError, UserError

PREFIX = "step-"
FILES = ("trainable.safetensors", "position.json", "recipe.json", "optimizer.bin")
SHARDED_FILES = ("fsdp_trained", "position.json", "recipe.json")  # sharded.TRAINED_FOLDER: torch's distributed checkpoint
OLD_SHARDED = f"{MODEL_NAME}_fsdp_0"  # accelerate's FSDP folder, which held every weight's slice (older sdtune)
DEEPSPEED_FILES = (MODEL_NAME, "position.json", "recipe.json")  # DeepSpeed's folder: weights and optimizer partitions
OLD_FORMAT = "states.pt"  # the single-process format of sdtune before accelerate wrote the engine state


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the data order's place."""

    step: int
    epoch: int
    batch_in_epoch: int  # batches of `epoch` already consumed by each process
    micro_steps: int  # accelerate's accumulation counter, so accumulation boundaries line up
    run_id: str = ""  # the run the checkpoint belongs to ("" in checkpoints of older sdtune)
    processes: int = 1  # how many processes shared the data order
    sharded: bool = False  # written under FSDP: the weights are accelerate's sharded files
    deepspeed: bool = False  # written under DeepSpeed: the weights and optimizer state are DeepSpeed's files


def save_checkpoint(
    root: Path,
    position: Position,
    trainable: dict[str, torch.Tensor] | None,
    recipe_json: str,
    keep_last: int,
    history: dict | None = None,
    ema_state: dict | None = None,
    tmp: Path | None = None,
) -> tuple[Path, list[Path]]:
    """Write ``root/step-<N>`` atomically, then keep only this run's last ``keep_last``.
    ``tmp`` is the temp folder the engine's files were already written into (by every
    process); without it one is made. Returns the checkpoint and the run's kept ones."""
    root = Path(root)
    final = root / f"{PREFIX}{position.step:08d}"
    if tmp is None:
        tmp = atomic.tmp_beside(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        if trainable is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        if ema_state is not None:
            torch.save(ema_state, tmp / "ema.pt")
        (tmp / "position.json").write_text(json.dumps(asdict(position)), encoding="utf-8")
        (tmp / "recipe.json").write_text(recipe_json, encoding="utf-8")
        (tmp / "history.json").write_text(json.dumps(history or {}), encoding="utf-8")
        atomic.publish_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mine = [p for p in list_checkpoints(root) if run_of(p) == position.run_id]
    for old in mine[:-keep_last]:
        shutil.rmtree(old)
    return final, mine[-keep_last:]


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "position.json").is_file())


def run_of(path: Path) -> str:
    """The run id a checkpoint belongs to."""
    try:
        return json.loads((Path(path) / "position.json").read_text(encoding="utf-8")).get("run_id", "")
    except (OSError, ValueError):
        return ""


def resolve(resume: str, root: Path) -> Path:
    """``latest`` (the newest complete checkpoint under ``root``) or a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            raise FileNotFoundError(
                f"--resume latest: no checkpoints under {root}; checkpoints are written with checkpoint.every_steps or "
                "checkpoint.every_epochs (or when a run is stopped with Ctrl-C / SIGTERM)"
            )
        return found[-1]
    path = Path(resume)
    if not (path / "position.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no position.json)")
    return path


def load_checkpoint(path: Path) -> tuple[Position, dict[str, torch.Tensor], dict, dict]:
    """Position, trainable weights, recipe and history of a checkpoint folder; the
    engine's files are accelerate's to read."""
    path = Path(path)
    position = _read_position(path)
    expected = SHARDED_FILES if position.sharded else DEEPSPEED_FILES if position.deepspeed else FILES
    for old in (OLD_FORMAT, OLD_SHARDED):
        if (path / old).exists():
            raise UserError(f"checkpoint {path} was written by an older sdtune (it has {old}); finish that run with "
                            "the sdtune that started it, or start this one afresh")
    missing = [name for name in expected if not (path / name).exists()]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete (no {', '.join(missing)}); resume from another one")
    try:
        trainable = {} if position.sharded or position.deepspeed else load_file(path / "trainable.safetensors")
        recipe = json.loads((path / "recipe.json").read_text(encoding="utf-8"))
        history_file = path / "history.json"
        history = json.loads(history_file.read_text(encoding="utf-8")) if history_file.is_file() else {}
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise _unreadable(path, exc) from None
    return position, trainable, recipe, history


def _read_position(path: Path) -> Position:
    try:
        return Position(**json.loads((path / "position.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise _unreadable(path, exc) from None


def _ema_file(path: Path, sharded: bool, process_index: int) -> Path:
    return Path(path) / (f"ema_{process_index}.pt" if sharded else "ema.pt")


def _unreadable(path: Path, exc: Exception) -> UserError:
    return UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); resume from another one")


def trainable_tensors(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The trainable weights of ``{"unet": ..., "text_encoder": ...}`` under prefixed names."""
    return {f"{prefix}.{name}": p for prefix, m in models.items() for name, p in m.named_parameters() if p.requires_grad}


def save_state(
    root: Path, position: Position, view, ema, accelerator, recipe_json: str,
    keep_last: int, params: list[torch.nn.Parameter], nan_advice: str, history: dict | None = None,
) -> tuple[Path | None, list[Path]]:
    """Every process calls it: each writes its share through accelerate into one temp
    folder, then the main one adds sdtune's files and publishes it (``view``: a
    ``sharded.ModelView`` of the trained models). Refuses to save non-finite weights.
    Returns the checkpoint and the run's kept checkpoints (main process; else None, [])."""
    from sdtune.compute import highest_on_any_process

    position = replace(position, sharded=view.sharded, deepspeed=view.deepspeed)
    weights = [getattr(p, "ds_tensor", p) for p in params]  # under ZeRO-3 the weights are placeholders for partitions
    if highest_on_any_process(int(not all(torch.isfinite(w).all() for w in weights)), accelerator):  # any process's slice
        raise FloatingPointError(f"non-finite weights at step {position.step}; no checkpoint written. {nan_advice}")
    final = Path(root) / f"{PREFIX}{position.step:08d}"
    tmp = [str(atomic.tmp_beside(final))] if accelerator.is_main_process else [None]
    if accelerator.num_processes > 1:
        broadcast_object_list(tmp)  # one folder for all: the main process's temp name
    tmp = Path(tmp[0])
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if view.sharded:  # the trained weights' and optimizer's slices, then accelerate's state of the rest
        view.save_trained(tmp)
        save_accelerator_state(str(tmp), [], [], [view.schedule], [], accelerator.process_index, accelerator.step,
                               accelerator.scaler)
    else:  # accelerate would write the whole models; sdtune writes only what trains
        hook = accelerator.register_save_state_pre_hook(lambda _models, weights, _dir: weights.clear())
        try:
            accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if view.deepspeed else {}))
        finally:
            hook.remove()
    if ema is not None and view.sharded:
        torch.save(ema.state_dict(), _ema_file(tmp, True, accelerator.process_index))
    accelerator.wait_for_everyone()
    saved, kept = None, []
    if accelerator.is_main_process:
        trainable = None if view.sharded or view.deepspeed else trainable_tensors(view.unwrapped)
        ema_state = ema.state_dict() if ema is not None and not view.sharded else None
        saved, kept = save_checkpoint(root, position, trainable, recipe_json, keep_last, history, ema_state, tmp)
    accelerator.wait_for_everyone()
    return saved, kept


# Lengthening a run or changing how it is saved is fine; anything else would
# silently train a different model than the checkpoint's.
RESUMABLE_CHANGES = ("train.max_steps", "train.log_every", "checkpoint", "output", "data.num_workers")


def start_or_resume(path: Path | None, recipe: dict, view, ema, accelerator) -> tuple[Position, dict]:
    """Where the run starts: step 0 with no history, or the checkpoint at ``path`` loaded
    into it (see ``resume_state``), which the main process says."""
    if path is None:
        return Position(step=0, epoch=0, batch_in_epoch=0, micro_steps=0), {}
    position, history = resume_state(path, recipe, view, ema, accelerator)
    if accelerator.is_local_main_process:
        print(f"sdtune: resumed from {path} at step {position.step}")
    return position, history


def resume_state(path: Path, recipe: dict, view, ema, accelerator) -> tuple[Position, dict]:
    """Load a checkpoint into the run (``recipe``: the run's recipe as a dict, to refuse a
    changed one; ``view``: a ``sharded.ModelView`` of the trained models). Returns where
    the run is and its history so far."""
    from sdtune.sharded import is_sharded
    from sdtune.zero import is_deepspeed, replay_cpu_adam_steps

    position, trainable, saved_recipe, history = load_checkpoint(path)
    then = "FSDP" if position.sharded else "DeepSpeed" if position.deepspeed else None
    now = "FSDP" if is_sharded(accelerator) else "DeepSpeed" if is_deepspeed(accelerator) else None
    if then != now:
        raise UserError(
            f"checkpoint {path} was written {f'under {then}' if then else 'without FSDP or DeepSpeed'}, and this run "
            f"{f'uses {now}' if now else 'does not use it'}: each engine's checkpoints are its own files (FSDP's hold "
            "each process's slice of the weights). Resume with the accelerate config (--config_file) the run was started with")
    changes = recipe_changes(saved_recipe, recipe, RESUMABLE_CHANGES)
    if changes:
        raise RecipeError(f"the recipe differs from the checkpoint's ({path}):\n  " + "\n  ".join(changes))
    if position.processes != accelerator.num_processes:
        raise UserError(
            f"checkpoint {path} was written by a run of {position.processes} process(es); this one has "
            f"{accelerator.num_processes}, which would change the batch order and the effective batch. Resume it with "
            f"{position.processes} process(es) (bash launch.sh train RECIPE --processes {position.processes} --resume latest)")
    if not (position.sharded or position.deepspeed):  # else accelerate loads the engine's weights below
        current = trainable_tensors(view.unwrapped)
        if current.keys() != trainable.keys():
            raise RecipeError(f"checkpoint {path} holds other trainable weights than this recipe creates")
        with torch.no_grad():
            for name, value in trainable.items():
                current[name].copy_(value)
    hook = accelerator.register_load_state_pre_hook(lambda models, _dir: models.clear())  # the weights are loaded above
    try:  # optimizer, schedule, grad scaler and this process's RNG
        # accelerate passes over an RNG file it cannot read with a log line; resuming would
        # then silently leave the trajectory, so read it first and stop instead.
        accelerate_load(Path(path) / f"random_states_{accelerator.process_index}.pkl")
        if position.sharded:
            view.load_trained(path)
            load_accelerator_state(str(path), [], [], [view.schedule], [], accelerator.process_index, accelerator.scaler)
        else:
            accelerator.load_state(str(path), **({"load_module_strict": False} if position.deepspeed else {}))  # a LoRA's alone
        if position.deepspeed:
            replay_cpu_adam_steps(accelerator)
        if ema is not None:
            ema.load_state_dict(torch.load(_ema_file(path, position.sharded, accelerator.process_index), weights_only=True))
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        raise _unreadable(Path(path), exc) from None
    finally:
        hook.remove()
    accelerator.step = position.micro_steps
    return position, history


def rng_states() -> dict[str, object]:
    states: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, object]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def recipe_changes(saved: dict, current: dict, allowed: tuple[str, ...]) -> list[str]:
    """Dotted keys whose values differ between two recipe dicts, except ``allowed`` ones."""
    changes = []
    for section in sorted(set(saved) | set(current)):
        before, after = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(before) | set(after)):
            dotted = f"{section}.{key}"
            if before.get(key) != after.get(key) and dotted not in allowed and section not in allowed:
                changes.append(f"{dotted}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes


class StopOnSignal:
    """While active, Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the
    current step (it saves a checkpoint and returns) instead of killing it
    mid-write. A second signal stops at once, as usual."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signal is not None:
            signal.default_int_handler(signum, frame)  # second signal: KeyboardInterrupt now
        self.signal = signum
        print(f"\nsdtune: signal {signum} received; stopping after this step (again to stop now)", flush=True)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def agreed(self, accelerator) -> int | None:
        """The signal all processes act on after this step: any one's (the highest), so
        they stop together at one step, or none does. One tiny all-reduce per step."""
        from sdtune.compute import highest_on_any_process

        return highest_on_any_process(self.signal or 0, accelerator) or None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
