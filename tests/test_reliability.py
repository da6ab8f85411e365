"""Nothing lost, nothing unsafe, no tracebacks (docs/reliability.md): runs own their
files, writes survive kills, pickles need permission, and every user mistake is one
paragraph with a documented exit status."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune import atomic, training_state
from sdtune.errors import EXIT_DIVERGED, EXIT_OUT_OF_MEMORY, EXIT_USER_ERROR, ModelFileError, UserError, run_command
from sdtune.export.kohya import read_lora
from sdtune.train import main

from conftest import ROOT
from test_train import _args


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# -- Output folders protect runs ----------------------------------------------------------------


def test_a_new_run_moves_the_earlier_one_aside_and_prunes_only_its_own_files(tiny_v, small_dataset, tmp_path):
    out = tmp_path / "out"
    first = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=2"))
    record = json.loads((out / "tiny-demo.run.json").read_text())
    assert record["status"] == "finished" and record["step"] == 6
    # keep_last applies to step exports too: those of the two kept checkpoints remain.
    assert sorted(p.name for p in out.glob("tiny-demo-step*")) == ["tiny-demo-step000004.safetensors", "tiny-demo-step000005.safetensors"]
    assert sorted(p.name for p in (out / "checkpoints" / "tiny-demo").iterdir()) == ["step-00000004", "step-00000005"]
    first_lora, _ = read_lora(first.output)

    # Without output.overwrite the next run of that name is refused, naming the run.
    with pytest.raises(UserError, match=record["run_id"]):
        main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=3", "output.overwrite=false"))
    # Another name in the same folder is its own run and touches nothing of this one.
    other = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2", "output.name=other", "output.overwrite=false"))
    assert other.output.is_file() and first.output.is_file()

    # With output.overwrite (the demo recipe's), the earlier run's files move aside, whole;
    # the new run's checkpoint is not pruned for the old run's higher steps.
    second = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=3", "checkpoint.every_steps=2"))
    aside = out / ".sdtune-replaced" / "tiny-demo"
    old, _ = read_lora(aside / "tiny-demo.safetensors")
    assert old.keys() == first_lora.keys() and all(torch.equal(old[k], first_lora[k]) for k in old)
    assert (aside / "checkpoints" / "tiny-demo" / "step-00000005").is_dir()
    assert sorted(p.name for p in (out / "checkpoints" / "tiny-demo").iterdir()) == ["step-00000002"]
    assert training_state.resolve("latest", out / "checkpoints" / "tiny-demo").name == "step-00000002"
    assert json.loads((out / "tiny-demo.run.json").read_text())["run_id"] != record["run_id"]
    assert second.output.is_file() and (out / "other.safetensors").is_file() and (out / "other.run.json").is_file()


def test_stale_temp_files_of_dead_processes_are_removed_at_start(tiny_v, small_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = atomic.tmp_beside(out / "tiny-demo.safetensors").with_name(f".tiny-demo.safetensors.{atomic.HOST}.{dead.pid}.tmp")
    stale.write_bytes(b"half a file")
    live = atomic.tmp_beside(out / "other.safetensors")  # this process: alive
    live.write_bytes(b"being written")
    main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=1"))
    assert not stale.exists() and live.exists()


def test_a_killed_writer_never_leaves_a_torn_file_and_a_later_start_cleans_up(tmp_path):
    """12 SIGKILLs at random moments of a loop that does nothing but write checkpoints,
    result files and folder exports with sdtune's writers: after every kill the newest
    checkpoint, the result file and the folder are each whole (every tensor holds one
    round's value), the next start resumes, and the cleanup of a later start leaves no
    temp file behind."""
    rng = random.Random(1)
    removed_total = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "crash_writer.py"), str(tmp_path)], stdout=subprocess.PIPE)
        assert proc.stdout.readline(), "the writer did not start"  # it has written at least one round
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        root = tmp_path / "checkpoints" / "run"
        latest = training_state.resolve("latest", root)
        position, weights, _, history = training_state.load_checkpoint(latest)
        optimizer = torch.load(latest / "optimizer.bin", weights_only=True)["state"][0]
        assert all((t == position.step).all() for t in [*weights.values(), optimizer["exp_avg"]])
        assert history["loss"] == [[position.step, float(position.step)]]
        assert len(training_state.list_checkpoints(root)) <= 2 + 1  # keep_last, plus one whose pruning was cut short
        result = load_file(tmp_path / "result.safetensors")
        assert len({float(t.flatten()[0]) for t in result.values()}) == 1
        assert len({float(t.flatten()[0]) for name in ("unet", "vae", "text_encoder")
                    for t in load_file(tmp_path / "folder" / name / "model.safetensors").values()}) == 1
        removed_total += len(atomic.remove_stale_temps(tmp_path))  # what the next start does
        assert not [p for p in tmp_path.rglob("*") if atomic.TMP_NAME.match(p.name)]
    assert removed_total > 0  # some kills did land mid-write


@pytest.mark.parametrize(("sharded", "old"), [(False, "states.pt"), (True, "pytorch_model_fsdp_0")])
def test_a_checkpoint_of_an_older_sdtune_is_refused_with_what_to_do(sharded, old, tmp_path):
    # sdtune's single-process file before accelerate wrote the engine state, and accelerate's
    # FSDP folder, which held every weight's slice, before sdtune wrote the trained ones alone.
    position = training_state.Position(step=4, epoch=0, batch_in_epoch=4, micro_steps=4, sharded=sharded)
    (tmp_path / "position.json").write_text(json.dumps(dataclasses.asdict(position)))
    (tmp_path / "recipe.json").write_text("{}")
    (tmp_path / old).mkdir()
    with pytest.raises(UserError, match=f"written by an older sdtune \\(it has {old}\\); finish that run with"):
        training_state.load_checkpoint(tmp_path)


def test_replacing_a_folder_swaps_it_in_one_step(tmp_path, monkeypatch):
    """A folder export replaces the old one with one renameat2(RENAME_EXCHANGE), not by moving
    the old aside first: there is no moment at which the folder is missing (a kill there
    would lose it). Renames are forbidden here, so only the swap can succeed."""
    final = tmp_path / "folder"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    tmp = atomic.tmp_beside(final)
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("new")

    def no_rename(*args):
        raise AssertionError(f"two-step rename {args}")

    monkeypatch.setattr(atomic.os, "replace", no_rename)
    atomic.publish_folder(tmp, final)
    assert (final / "model.safetensors").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_a_killed_training_run_resumes_from_its_last_whole_checkpoint(tiny_v, small_dataset, tmp_path):
    def command(steps: int) -> list[str]:
        return [sys.executable, "-m", "sdtune", "train", *_args(tiny_v, small_dataset, tmp_path, f"train.max_steps={steps}",
                "checkpoint.every_steps=5", "checkpoint.keep_last=2", "train.deterministic=true")]

    proc = subprocess.Popen(command(400), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    root = tmp_path / "out" / "checkpoints" / "tiny-demo"
    deadline = time.time() + 120
    while len(training_state.list_checkpoints(root)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(2).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = training_state.resolve("latest", root)
    resumed = subprocess.run([*command(int(latest.name.split("-")[1]) + 3), "--resume", "latest"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {latest}" in resumed.stdout
    assert not [p for p in (tmp_path / "out").rglob("*") if atomic.TMP_NAME.match(p.name)]
    assert json.loads((tmp_path / "out" / "tiny-demo.run.json").read_text())["status"] == "finished"


def test_report_of_a_resumed_run_shows_the_whole_run(tiny_v, small_dataset, tmp_path):
    out = tmp_path / "out"
    common = ("train.log_every=1", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "train.deterministic=true")
    main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=4", *common))
    whole = (out / "tiny-demo.report.html").read_text()
    step2 = out / "checkpoints" / "tiny-demo" / "step-00000002"
    main([*_args(tiny_v, small_dataset, tmp_path, "train.max_steps=4", *common), "--resume", str(step2)])
    resumed = (out / "tiny-demo.report.html").read_text()

    def loss_points(page: str) -> int:
        chart = page[page.index("Training loss"):]
        return len(chart[chart.index('points="') + 8 : chart.index('"', chart.index('points="') + 8)].split())

    assert loss_points(whole) == 4 and loss_points(resumed) == 4  # steps 1-2 came from the checkpoint


# -- One loading policy -------------------------------------------------------------------------


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch boom-was-run",))


def test_pickles_anywhere_need_the_flag_and_load_as_tensors_only(tiny_v, tmp_path, monkeypatch):
    import shutil

    from sdtune.export.kohya import read_lora
    from sdtune.models import load_components

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_v, folder)
    unet = folder / "unet"
    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"unet/diffusion_pytorch_model.bin.*model.allow_pickle: true"):
        load_components(folder, "v_prediction", False)
    assert load_components(folder, "v_prediction", False, allow_pickle=True).unet is not None

    lora = tmp_path / "lora.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, lora)
    with pytest.raises(ModelFileError, match="allow_pickle"):
        read_lora(lora)
    assert read_lora(lora, allow_pickle=True)[0].keys() == {"lora_unet_x.lora_down.weight"}

    hostile = tmp_path / "hostile.ckpt"
    hostile.write_bytes(pickle.dumps({"state_dict": _Boom()}))
    code = subprocess.run([sys.executable, "-m", "sdtune", "inspect", str(hostile), "--allow-pickle"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert code.returncode == EXIT_USER_ERROR and "holds objects other than tensors" in code.stderr
    assert "Traceback" not in code.stderr and not (tmp_path / "boom-was-run").exists()


def test_a_checkpoint_holding_a_pickled_object_is_refused_not_run(tiny_v, small_dataset, tmp_path, monkeypatch):
    """Every file of a checkpoint is read as tensors only: accelerate's optimizer, schedule
    and RNG files, and sdtune's EMA state, whichever one an attacker replaces."""
    monkeypatch.chdir(tmp_path)
    args = _args(tiny_v, small_dataset, tmp_path, "train.max_steps=2", "checkpoint.every_steps=1", "ema.enabled=true")
    args[1] = str(ROOT / args[1])  # (the payload would write into the working directory: this test's)
    main(args)
    step1 = tmp_path / "out" / "checkpoints" / "tiny-demo" / "step-00000001"
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "ema.pt"):
        assert (step1 / name).is_file()
        original = (step1 / name).read_bytes()
        (step1 / name).write_bytes(pickle.dumps({"state": _Boom()}, protocol=2))
        with pytest.raises(UserError, match=r"checkpoint .*step-00000001 cannot be read"):
            main([*args, "--resume", str(step1)])
        assert not (tmp_path / "boom-was-run").exists(), name
        (step1 / name).write_bytes(original)
    assert main([*args, "--resume", str(step1)]).steps == 2


# -- One paragraph, no traceback, documented exit statuses --------------------------------------


def _sdtune(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "sdtune", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})})


def _one_paragraph(stderr: str) -> str:
    """The one error message (it may list several files, one a line), and nothing after it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("sdtune: error:") == 1, stderr[-3000:]
    return stderr[stderr.index("sdtune: error:"):]


@pytest.mark.parametrize("setting,expected", [
    ("model.path={garbage}", "is not a readable safetensors file"),
    ("lora.merge_first={garbage}", "is not a readable safetensors file"),
    ("train.learning_rate=.inf", "learning_rate"),
    ("train.learning_rate=1e4", "learning_rate"),
    ("data.path={missing}", "data.path"),
])
def test_user_mistakes_are_one_paragraph_with_status_2(tiny_v, small_dataset, tmp_path, setting, expected, capsys):
    """In-process (`sdtune.cli.main` is the command); a real process is checked below."""
    from sdtune.cli import main as cli_main

    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all" * 10)
    setting = setting.format(garbage=garbage, missing=tmp_path / "nowhere")
    assert cli_main(["train", *_args(tiny_v, small_dataset, tmp_path, "train.max_steps=1", setting)]) == EXIT_USER_ERROR
    assert expected in _one_paragraph(capsys.readouterr().err)


def test_yaml_syntax_error_says_where(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 3\n  learning_rate: [1e-4\n")
    run = _sdtune("data", "--recipe", str(recipe))
    assert run.returncode == EXIT_USER_ERROR and "line" in _one_paragraph(run.stderr)
    debug = _sdtune("data", "--recipe", str(recipe), "--debug")
    assert "Traceback" in debug.stderr  # --debug shows where it came from


def test_non_finite_training_and_out_of_memory_have_their_own_statuses(tiny_v, small_dataset, tmp_path, capsys):
    from sdtune.cli import main as cli_main  # in this process: the statuses are the CLI's, not the interpreter's

    code = cli_main(["train", *_args(tiny_v, small_dataset, tmp_path, "train.max_steps=30", "train.learning_rate=10",
                                     "lora.alpha=8", "train.max_grad_norm=0", "train.lr_warmup_steps=0")])
    assert code == EXIT_DIVERGED and "learning_rate" in _one_paragraph(capsys.readouterr().err)

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert run_command(out_of_memory) == EXIT_OUT_OF_MEMORY
    err = capsys.readouterr().err
    assert "out of memory" in err and "train.batch_size" in err and "train.gradient_checkpointing" in err


def test_errors_and_threads_under_accelerate_launch(tiny_v, small_dataset, tmp_path):
    """With -q, a failed run under accelerate shows sdtune's paragraph alone. The process
    uses every core although accelerate set OMP_NUM_THREADS=1 for it (the user did not)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "-q", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "sdtune/train.py",
               *_args(tiny_v, small_dataset, tmp_path, "train.max_steps=1", f"model.path={tmp_path / 'absent'}")]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert run.returncode != 0 and "model.path" in _one_paragraph(run.stderr)
    cores = len(os.sched_getaffinity(0))
    assert f"sdtune: {cores} CPU thread(s) per process ({cores} cores / 1 process)" in run.stdout, run.stdout


def test_without_q_sdtune_says_why_accelerates_traceback_follows(monkeypatch):
    from sdtune import errors

    for argv, hint in ((["accelerate", "launch", "sdtune/train.py"], True), (["accelerate", "launch", "-q", "x"], False),
                       (["bash", "launch.sh"], False)):
        parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", *argv])
        try:
            monkeypatch.setattr(errors.os, "getppid", lambda: parent.pid)
            time.sleep(0.05)
            assert (errors._launcher_hint() is not None) == hint, argv
        finally:
            parent.kill()
            parent.wait()


def test_threads_follow_the_users_setting_not_the_launchers(monkeypatch):
    from sdtune import compute

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(compute.ACCELERATE_CHILD, raising=False)
    assert compute.user_threads() == 1  # no launcher: the user's
    monkeypatch.setenv(compute.ACCELERATE_CHILD, "no")
    monkeypatch.setattr(compute, "_parent_environment", lambda: {"PATH": "/bin"})
    assert compute.user_threads() is None  # set by accelerate's launcher only
    monkeypatch.setattr(compute, "_parent_environment", lambda: {"OMP_NUM_THREADS": "1"})
    assert compute.user_threads() == 1
    assert compute.set_threads(2) == (1, "OMP_NUM_THREADS") and torch.get_num_threads() == 1


def test_a_lora_that_changes_nothing_is_named_at_the_end_of_the_run(tiny_v, small_dataset, tmp_path, capsys):
    """A learning rate so small that every update rounds to zero in the fp16 export: the
    file loads in the UIs and changes nothing, and the run says so; a real run does not."""
    main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=1", "train.learning_rate=1e-9", "train.lr_warmup_steps=0"))
    assert "56 of 56 LoRA layers change nothing" in capsys.readouterr().err
    main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2", "output.name=real"))
    assert "change nothing" not in capsys.readouterr().err


def test_a_large_files_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """Base-model hashes are remembered across runs, keyed by the files' identity and
    change times: a second run reads nothing, and a file rewritten in place with its
    size and modification time put back is hashed again (its ctime moved)."""
    import hashlib

    from sdtune import hashes

    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashes, "REMEMBER_FROM_BYTES", 1)
    folder = tmp_path / "unet"
    folder.mkdir()
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"a" * 4096)
    (folder / "config.json").write_text("{}")
    by_hand = hashlib.sha256(b"unet/config.json\0{}unet/diffusion_pytorch_model.safetensors\0" + b"a" * 4096).hexdigest()
    first = hashes.weights_sha256(folder)
    whole_file = hashes.file_sha256(weights)
    assert first == by_hand and whole_file == hashlib.sha256(b"a" * 4096).hexdigest()
    assert len(list((tmp_path / "cache" / "hashes").rglob("*.txt"))) == 2

    def no_reading(*args):
        raise AssertionError("a remembered digest was computed again")

    monkeypatch.setattr(hashes, "_read_into", no_reading)
    assert hashes.weights_sha256(folder) == first and hashes.file_sha256(weights) == whole_file
    monkeypatch.undo()
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashes, "REMEMBER_FROM_BYTES", 1)

    before = weights.stat()
    with open(weights, "r+b") as handle:  # same size, same mtime afterwards: only the ctime tells
        handle.write(b"b")
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_mtime_ns == before.st_mtime_ns and weights.stat().st_size == before.st_size
    assert hashes.file_sha256(weights) == hashlib.sha256(b"b" + b"a" * 4095).hexdigest()
    assert hashes.weights_sha256(folder) != first

    # A cache folder that cannot be written costs only the hashing.
    monkeypatch.setenv("SDTUNE_CACHE", str(weights))  # a file: nothing can be made below it
    assert hashes.file_sha256(weights) == hashlib.sha256(b"b" + b"a" * 4095).hexdigest()
