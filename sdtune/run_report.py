"""What a training run says and records besides its weights: the announcement at start,
the logged losses, the resume hint after a stop, report.html and the closing summary."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import torch

from sdtune import atomic, training_state
from sdtune.data.plan import DataPlan, skipped_report, warnings_for
from sdtune.outputs import RunFolder
from sdtune.report import render_report

NAN_ADVICE = "Likely causes: train.learning_rate too high, or fp16 overflow (try bf16)"


def announce(plan: DataPlan, model_name: str, base_model_version: str, folder: RunFolder, claimed: list[str], logger: str,
              batch: tuple[int, int, int]) -> None:
    """What the run trains on and where it writes (main process), once it owns its files;
    ``batch``: (per-process batch, processes, accumulation steps)."""
    for line in claimed:
        print(f"sdtune: {line}", file=sys.stderr)
    print(f"sdtune: {plan.images} images ({len(plan.train)} per epoch) from {', '.join(plan.sources)}; base {model_name} ({base_model_version})")
    print(f"sdtune: effective batch {math.prod(batch)} = batch {batch[0]} x {batch[1]} process(es) x {batch[2]} accumulation step(s)")
    for line in warnings_for(plan):
        print(f"sdtune: {line}", file=sys.stderr)
    if plan.skipped:
        folder.add(atomic.write_text(folder.skipped, skipped_report(plan)))
    folder.add(folder.checkpoints, *([folder.dir / "logs" / folder.name] if logger != "none" else []))


def log_losses(recent_losses: list[torch.Tensor], lr: float, step: int, bar, accelerator, history: dict) -> None:
    """The mean loss since the last log (the loop's one host sync), to the bar, the trackers and report.html."""
    recent = accelerator.reduce(torch.stack(recent_losses).mean(), "mean").item()  # over all processes
    if not math.isfinite(recent):
        raise FloatingPointError(f"loss is {recent} at step {step}; nothing was written. {NAN_ADVICE}")
    bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"train/loss": recent, "train/lr": lr}, step=step)
    history["loss"].append((step, recent))
    history["lr"].append((step, lr))


def finish(written, folder: RunFolder, recipe_yaml: str, parts, prediction_type: str, zero_terminal_snr: bool,
            images: int, step: int, steps: int, elapsed: float, skipped: int, history: dict) -> None:
    """The resolved recipe and report.html beside the results, the run recorded as finished, and where everything is."""
    folder.add(*written, atomic.write_text(folder.recipe, recipe_yaml))
    peak = peak_gpu_memory()
    summary = {"base model": f"{parts.name} ({parts.base_model_version}, {prediction_type}"
               f"{', zero terminal SNR' if zero_terminal_snr else ''})", "steps": str(step),
               "images": str(images), "outputs": ", ".join(str(p) for p in written)} | ({"peak GPU memory": peak} if peak else {})
    previews, validation = [(s, Path(p)) for s, p in history["previews"] if Path(p).is_file()], history["validation"]
    folder.add(atomic.write_text(folder.report, render_report(folder.name, summary, history, validation, previews, recipe_yaml)))
    folder.set_status("finished", step)
    if skipped:
        print(f"sdtune: skipped {skipped} batches with a non-finite loss")
    if validation:
        print(f"sdtune: validation loss {sum(validation[-1][1].values()) / len(validation[-1][1]):.4f} at step {validation[-1][0]}")
    print(f"sdtune: trained {steps} steps in {elapsed:.1f}s ({steps / elapsed:.2f} steps/s)" + (f"; peak GPU memory {peak}" if peak else ""))
    for path in [*written, folder.report]:
        print(f"sdtune: wrote {path}")
    print(f"sdtune: recipe {folder.recipe}; logs {folder.dir / 'logs' / folder.name}")


def peak_gpu_memory() -> str | None:
    """The most GPU memory this process's tensors held at once ("9.87 GiB"), or None without CUDA."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (main process, {torch.cuda.get_device_name()})"


def warn_unchanged_layers(lora_file: Path) -> None:
    """Layers that got no gradient are exported as zeros: say so, as `sdtune inspect` would."""
    from sdtune.export.inspect import zero_update_layers
    from sdtune.export.kohya import read_lora

    tensors = read_lora(lora_file)[0]
    unchanged = zero_update_layers(tensors)
    if unchanged:
        total = len({k.split(".", 1)[0] for k in tensors})
        print(f"sdtune: warning: {len(unchanged)} of {total} LoRA layers change nothing (their update is exactly zero: "
              f"no gradient reached them), e.g. {', '.join(unchanged[:2])}; `sdtune inspect {lora_file}` lists them", file=sys.stderr)


def print_resume(signal: int, step: int, saved: Path | None) -> None:
    print(f"sdtune: stopped by signal {signal} after step {step}; state saved to {saved}")
    print("sdtune: resume with the same command plus --resume latest:")
    print("  " + " ".join(shlex.quote(a) for a in [sys.executable, *without_resume(sys.argv), "--resume", "latest"]))


def without_resume(argv: list[str]) -> list[str]:
    """``argv`` less any ``--resume X`` / ``--resume=X`` it already had (a resumed run stopped again)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return kept


def keep_step_exports(folder: RunFolder, kept: list[Path], written: list[Path]) -> None:
    """Record a step export, and keep only those of the kept checkpoints (checkpoint.keep_last)."""
    folder.add(*written)
    folder.prune_step_exports({int(p.name.removeprefix(training_state.PREFIX)) for p in kept})


def floats(losses: list[torch.Tensor]) -> list[float]:
    return torch.stack(losses).float().cpu().tolist() if losses else []


def flat_config(tree: dict, prefix: str = "") -> dict:
    """Recipe as flat scalars, which is what TensorBoard's hparams accept."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_config(value, f"{name}.")
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat
