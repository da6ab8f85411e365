"""How sdtune reports a mistake: one paragraph that says what is wrong and what to
set, and a documented exit status, never a traceback (``--debug`` or
``SDTUNE_DEBUG=1`` shows it).

Every command runs through ``run_command``. Exit statuses:

- 0: done.
- 2: a mistake the user can fix (``UserError`` and its kinds: recipe, data,
  model or LoRA file, missing optional package), and the ``ValueError``,
  ``FileNotFoundError`` and ``FileExistsError`` that checks raise with such a
  message.
- 3: training stopped on a non-finite loss or weights (``FloatingPointError``);
  nothing unfinished was written.
- 4: out of memory (CPU or GPU), with the settings that lower it.
- 128 + N: stopped by signal N (Ctrl-C: 130, SIGTERM: 143) after saving.

Under ``accelerate launch``, accelerate itself reports a failed process: add
``-q`` (``accelerate launch -q ...``) so it leaves out its own traceback, and
it exits 1.
"""

from __future__ import annotations

import os
import sys

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_OUT_OF_MEMORY = 4

OOM_ADVICE = (
    "lower train.batch_size (and raise train.gradient_accumulation_steps to keep the effective batch), "
    "set train.gradient_checkpointing: true, use train.mixed_precision: bf16 (fp16 on older GPUs), "
    "or lower data.resolution"
)


class UserError(Exception):
    """A mistake the user can fix; the message says what to change."""


class RecipeError(UserError, ValueError):
    """A recipe that cannot run (YAML, keys, types, ranges, cross-field rules)."""


class DataError(UserError, ValueError):
    """A dataset problem: files, captions, metadata tables, cache entries."""


class ModelFileError(UserError, ValueError):
    """A model, LoRA or checkpoint file that is not what it should be (not safetensors,
    truncated, a pickle without permission, the wrong kind of model)."""


class MissingExtraError(UserError, ImportError):
    """An optional package a setting needs is not installed; the message names the extra."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError)


def debugging() -> bool:
    return os.environ.get("SDTUNE_DEBUG", "") not in ("", "0")


def take_debug_flag(argv: list[str]) -> list[str]:
    """``--debug`` anywhere in the arguments: show tracebacks (in every process, through the environment)."""
    if "--debug" in argv:
        os.environ["SDTUNE_DEBUG"] = "1"
    return [a for a in argv if a != "--debug"]


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower()


def run_command(action) -> int:
    """Run ``action`` and turn what it raises into one ``sdtune: error:`` paragraph and an
    exit status (module docstring). A result with ``stopped_by`` (a signal) gives 128 + it."""
    try:
        result = action()
    except KeyboardInterrupt:
        print("\nsdtune: interrupted", file=sys.stderr)
        return 130
    except FloatingPointError as exc:
        return _report(exc, EXIT_DIVERGED)
    except USER_ERRORS as exc:
        return _report(exc, EXIT_USER_ERROR)
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        return _report(exc, EXIT_OUT_OF_MEMORY, f"out of memory ({str(exc).splitlines()[0][:200]}); {OOM_ADVICE}")
    stopped_by = getattr(result, "stopped_by", None)
    return 128 + stopped_by if stopped_by else 0  # the shell's code for "ended by this signal"


def _report(exc: BaseException, status: int, message: str | None = None) -> int:
    if debugging():
        raise exc
    print(f"sdtune: error: {message or exc}", file=sys.stderr)
    hint = _launcher_hint()
    if hint:
        print(hint, file=sys.stderr)
    return status


def _launcher_hint() -> str | None:
    """Under ``accelerate launch`` without ``-q``, say why a traceback follows."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            parent = handle.read().split(b"\0")
    except OSError:
        return None
    names = [os.path.basename(part.decode(errors="replace")) for part in parent]
    if "launch" in names and any(n.startswith("accelerate") for n in names) and not {"-q", "--quiet"} & set(names):
        return "sdtune: (accelerate adds its own traceback of the launcher below; `accelerate launch -q ...` leaves it out)"
    return None
