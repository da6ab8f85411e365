"""Side by side: sdtune, diffusers' train_text_to_image_lora.py and kohya's train_network.py on the same work.

    python benchmarks/peers.py --diffusers-example PATH/train_text_to_image_lora.py --kohya PATH/sd-scripts
                               --peers-python /tmp/peers/venv/bin/python [--kohya-python PY]
                               [--model tiny|sd15] [--steps N] [--repeat K] [--images N] [--threads T] [--work DIR]
                               [--mixed-precision no|bf16]

Same work for each (benchmarks/peers.md lists it): one base model, datasets/sample in each
trainer's layout, LoRA rank 4 / alpha 4 on the UNet only, fp32 (or each trainer's own bf16 mixed
precision with --mixed-precision bf16), AdamW lr 1e-4 constant, square
center crops, the same batch, resolution, steps, seed and OMP_NUM_THREADS. Each feeds the UNet
its own way: sdtune caches latents and text-encoder outputs, kohya latents (--cache_latents),
the diffusers example encodes both at every step; --images N with steps x batch = N makes all
three VAE-encode each image once.

The trainers run in turn, in a rotated order each repeat, each under /usr/bin/time -v:
  wall_s          launch to exit
  first_step_s    launch to the trainer's own progress bar first showing a finished step
  s_per_step      seconds between that bar's first and last steps, timestamped here as the
                  bar's redraws arrive, divided by the steps between them
  tqdm_s_per_step the rate the bar itself shows at its last step (tqdm's moving average)
  peak_rss_mb     time -v's "Maximum resident set size" (the largest process of its tree)
Prints one JSON object, then a markdown table of medians and ratios (sdtune / peer).
kohya's UNet is hard-coded to SD 1.x widths (library/original_unet.py), so it runs on sd15 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "datasets" / "sample"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
BAR_DESC = {"sdtune": "training", "diffusers": "Steps", "kohya": "steps"}  # each trainer's step bar
TQDM = re.compile(
    r"(?P<desc>[^|]*?):\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<elapsed>[\d:]+)<[^,\]]*"
    r"(?:,\s*(?P<rate>[\d.]+)(?P<unit>s/\w+|\w+/s))?"
)
SDTUNE_LINE = re.compile(r"sdtune: trained (\d+) steps in ([\d.]+)s \(([\d.]+) steps/s\)")


def sample_pairs(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) for every image of a folder with a same-named .txt caption beside it."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, p.with_suffix(".txt").read_text().strip()) for p in images]


def write_sdtune_layout(pairs: list[tuple[Path, str]], dest: Path) -> Path:
    """sdtune's folder source: images with same-named .txt captions."""
    dest.mkdir(parents=True, exist_ok=True)
    for image, caption in pairs:
        shutil.copy(image, dest / image.name)
        (dest / image.name).with_suffix(".txt").write_text(caption + "\n")
    return dest


def write_diffusers_layout(pairs: list[tuple[Path, str]], dest: Path) -> Path:
    """A datasets "imagefolder": the images and a metadata.jsonl of {"file_name", "text"} (the
    example's default --caption_column). No .txt files, which imagefolder would read as data."""
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "metadata.jsonl", "w") as metadata:
        for image, caption in pairs:
            shutil.copy(image, dest / image.name)
            metadata.write(json.dumps({"file_name": image.name, "text": caption}) + "\n")
    return dest


def write_kohya_layout(pairs: list[tuple[Path, str]], dest: Path, repeats: int = 1, concept: str = "sample") -> Path:
    """kohya's DreamBooth-style --train_data_dir: a `<repeats>_<concept>` folder of images with
    .txt captions (--caption_extension .txt). Returns the --train_data_dir."""
    write_sdtune_layout(pairs, dest / f"{repeats}_{concept}")
    return dest


def write_inputs(pairs: list[tuple[Path, str]], model: Path, root: Path) -> dict[str, Path]:
    """Each trainer's copy of the data, and kohya's --tokenizer_cache_dir: kohya reads
    <dir>/<hub id with _> with its transformers 4, whose slow CLIPTokenizer wants the BPE
    files the model's tokenizer.json was built from (sdtune/clip_bpe)."""
    shutil.rmtree(root, ignore_errors=True)
    tokenizer = root / "kohya-tokenizer" / "openai_clip-vit-large-patch14"
    shutil.copytree(model / "tokenizer", tokenizer)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ROOT / "sdtune" / "clip_bpe" / name, tokenizer / name)
    return {"sdtune": write_sdtune_layout(pairs, root / "sdtune"), "diffusers": write_diffusers_layout(pairs, root / "diffusers"),
            "kohya": write_kohya_layout(pairs, root / "kohya"), "kohya_tokenizer": tokenizer.parent}


def parse_tqdm(line: str, desc: str | None = None) -> dict | None:
    """n, total, elapsed_s and s_per_it (None before tqdm has a rate) of one redraw of a bar."""
    m = TQDM.search(line)
    if m is None or (desc is not None and not m["desc"].strip().endswith(desc)):
        return None
    elapsed = 0
    for part in m["elapsed"].split(":"):
        elapsed = elapsed * 60 + int(part)
    rate = None
    if m["rate"] is not None:
        rate = float(m["rate"]) if m["unit"].startswith("s/") else 1 / float(m["rate"])
    return {"n": int(m["n"]), "total": int(m["total"]), "elapsed_s": elapsed, "s_per_it": rate}


def parse_time_v(text: str) -> dict:
    """Peak RSS (MB) and wall time (s) from GNU time -v's report."""
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1])
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)[1]
    wall = 0.0
    for part in clock.split(":"):
        wall = wall * 60 + float(part)
    return {"peak_rss_mb": rss_kb / 1024, "time_wall_s": wall}


def step_times(events: list[tuple[float, dict]]) -> dict:
    """first_step_s and s_per_step from (seconds since launch, bar) pairs of the step bar."""
    done = [(t, bar) for t, bar in events if bar["n"] >= 1]
    if not done:
        return {"first_step_s": None, "s_per_step": None, "tqdm_s_per_step": None}
    (t0, first), total = done[0], done[0][1]["total"]
    t1, last = next(((t, bar) for t, bar in done if bar["n"] == total), done[-1])
    per_step = (t1 - t0) / (last["n"] - first["n"]) if last["n"] > first["n"] else None
    return {"first_step_s": t0, "s_per_step": per_step, "tqdm_s_per_step": last["s_per_it"]}


def run_timed(cmd: list[str], env: dict, cwd: Path, log: Path, desc: str) -> dict:
    """Run under /usr/bin/time -v, timestamping the step bar's redraws as they arrive."""
    report = log.with_suffix(".time")
    started = time.monotonic()
    proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(report), *cmd], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    events, pending = [], b""
    with open(log, "wb", buffering=0) as out:  # unbuffered: the log can be watched
        while chunk := proc.stdout.read1(1 << 16):
            now = time.monotonic() - started
            out.write(chunk)
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            # tqdm starts a redraw with \r, so the newest one is the unterminated tail; a redraw seen
            # twice (as the tail, then whole) counts from its first sighting
            events += [(now, bar) for line in [*lines, pending] if (bar := parse_tqdm(line.decode(errors="replace"), desc))]
    result = {"rc": proc.wait(), "wall_s": time.monotonic() - started, **step_times(events)}
    if report.is_file() and "Maximum resident" in report.read_text():
        result.update(parse_time_v(report.read_text()))
    text = log.read_text(errors="replace")
    if m := SDTUNE_LINE.search(text):
        result["sdtune_line"] = m[0]
    if result["rc"] != 0:
        result["tail"] = text.strip().splitlines()[-3:]
    return result


def build_model(kind: str, folder: Path) -> Path:
    """The base model as a diffusers folder, built once: sdtune's tiny model (epsilon), or SD 1.5's
    topology at full width with random weights (the model benchmarks/train.py --model sd15 builds)."""
    if (folder / "model_index.json").is_file():
        return folder
    if kind == "tiny":
        subprocess.run([sys.executable, "-m", "sdtune", "make-tiny", "--prediction", "eps", str(folder)], cwd=ROOT, check=True)
        return folder
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT))
    from sdtune.export.checkpoint import base_config
    from sdtune.tiny import clip_tokenizer

    configs = base_config("sd_v1")
    torch.manual_seed(0)
    StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=clip_tokenizer(configs["tokenizer"]["pad_token"]), unet=UNet2DConditionModel.from_config(configs["unet"]),
        scheduler=DDIMScheduler.from_config(configs["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder, safe_serialization=True)
    return folder


def commands(args, model: Path, data: dict[str, Path], out: Path) -> dict[str, tuple[list[str], Path]]:
    """Each trainer's command line and working directory for one run writing under ``out``."""
    n, b, r, lr = str(args.steps), str(args.batch_size), str(args.resolution), str(args.learning_rate)
    sets = {
        "model.path": model, "model.prediction_type": "epsilon", "model.zero_terminal_snr": "false",
        "data.path": data["sdtune"], "data.cache_dir": out / "sdtune-cache", "data.resolution": r,
        "data.max_aspect_ratio": 1, "data.max_upscale": 8, "data.caption_dropout": 0, "data.num_workers": 0,
        "data.validation_split": 0, "lora.rank": 4, "lora.alpha": 4, "train.max_steps": n, "train.batch_size": b,
        "train.learning_rate": lr, "train.lr_scheduler": "constant", "train.lr_warmup_steps": 0,
        "train.min_snr_gamma": "null", "train.mixed_precision": args.mixed_precision, "train.logger": "none", "train.seed": 0,
        "preview.prompts": "[]", "output.dir": out / "sdtune",
    }
    sdtune = [sys.executable, "-m", "sdtune", "train", "--recipe", "recipes/tiny_demo.yaml"]
    sdtune += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    diffusers = [args.peers_python, str(args.diffusers_example), "--pretrained_model_name_or_path", str(model),
                 "--train_data_dir", str(data["diffusers"]), "--output_dir", str(out / "diffusers"),
                 "--cache_dir", str(out / "hf-datasets"), "--resolution", r, "--center_crop", "--train_batch_size", b,
                 "--max_train_steps", n, "--learning_rate", lr, "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                 "--rank", "4", "--mixed_precision", args.mixed_precision, "--seed", "0", "--dataloader_num_workers", "0"]
    kohya = [args.kohya_python or args.peers_python, str(args.kohya / "train_network.py"),
             "--pretrained_model_name_or_path", str(model), "--tokenizer_cache_dir", str(data["kohya_tokenizer"]),
             "--train_data_dir", str(data["kohya"]), "--caption_extension", ".txt", "--output_dir", str(out / "kohya"),
             "--output_name", "lora", "--save_model_as", "safetensors", "--resolution", r, "--train_batch_size", b,
             "--max_train_steps", n, "--learning_rate", lr, "--lr_scheduler", "constant", "--optimizer_type", "AdamW",
             "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4",
             "--network_train_unet_only", "--mixed_precision", args.mixed_precision, "--save_precision", "float", "--seed", "0",
             "--max_data_loader_n_workers", "0", "--cache_latents", "--sdpa"]
    return {"sdtune": (sdtune, ROOT), "diffusers": (diffusers, args.diffusers_example.parent), "kohya": (kohya, args.kohya)}


def summarise(runs: list[dict], trainers: list[str]) -> tuple[dict, dict]:
    """Medians per trainer over successful runs, and sdtune / peer ratios."""
    keys = ("wall_s", "first_step_s", "s_per_step", "tqdm_s_per_step", "peak_rss_mb")
    medians = {}
    for t in trainers:
        ok = [r for r in runs if r["trainer"] == t and r["rc"] == 0]
        medians[t] = {k: statistics.median(v) if (v := [r[k] for r in ok if r.get(k) is not None]) else None for k in keys}
        medians[t]["runs_ok"] = f"{len(ok)}/{sum(r['trainer'] == t for r in runs)}"
    s, ratios = medians.get("sdtune", {}), {}
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    for peer in (t for t in trainers if s and t != "sdtune"):
        p = medians[peer]
        ratios[peer] = {"steps_per_s": ratio(p["s_per_step"], s["s_per_step"]),  # sdtune steps/s / peer's
                        "peak_rss": ratio(s["peak_rss_mb"], p["peak_rss_mb"]),
                        "first_step": ratio(s["first_step_s"], p["first_step_s"]), "wall": ratio(s["wall_s"], p["wall_s"])}
    return medians, ratios


def markdown(medians: dict, ratios: dict) -> str:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    rows = ["| trainer | runs ok | s/step | tqdm s/step | first step s | wall s | peak RSS MB | sdtune steps/s ÷ | sdtune RSS ÷ | sdtune first step ÷ |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for t, m in medians.items():
        r = ratios.get(t, {})
        rows.append(f"| {t} | {m['runs_ok']} | {fmt(m['s_per_step'], '.3f')} | {fmt(m['tqdm_s_per_step'], '.3f')} | "
                    f"{fmt(m['first_step_s'], '.1f')} | {fmt(m['wall_s'], '.1f')} | {fmt(m['peak_rss_mb'], '.0f')} | "
                    f"{fmt(r.get('steps_per_s'), '.2f')} | {fmt(r.get('peak_rss'), '.2f')} | {fmt(r.get('first_step'), '.2f')} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffusers-example", type=Path, required=True, help="examples/text_to_image/train_text_to_image_lora.py")
    parser.add_argument("--kohya", type=Path, required=True, help="a kohya-ss/sd-scripts checkout")
    parser.add_argument("--peers-python", required=True, help="python of the venv the peers are installed in")
    parser.add_argument("--kohya-python", help="kohya's own venv, when its pins clash with the diffusers example's")
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--images", type=int, help="train on the first N images of datasets/sample (default: all)")
    parser.add_argument("--trainers", default="sdtune,diffusers,kohya", help="comma-separated, sdtune first")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="all three trainers' own mixed-precision setting (bf16: frozen weights in bf16, autocast)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdtune-peers"))
    args = parser.parse_args()
    args.batch_size = args.batch_size or (4 if args.model == "tiny" else 1)
    args.resolution = args.resolution or (64 if args.model == "tiny" else 256)  # tiny: its native 8x8 latents

    model = build_model(args.model, args.work / "models" / args.model)
    data = write_inputs(sample_pairs(SAMPLE)[: args.images], model, args.work / "data")
    trainers = [t for t in args.trainers.split(",") if t != "kohya" or args.model == "sd15"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}  # every bar redraws at every step, for all three
    load = lambda: Path("/proc/loadavg").read_text().split()[:3]  # noqa: E731
    runs, load_before = [], load()
    for rep in range(args.repeat):
        order = trainers[rep % len(trainers):] + trainers[:rep % len(trainers)]
        for trainer in order:
            out = args.work / "runs" / f"{args.model}-{rep}-{trainer}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            cmd, cwd = commands(args, model, data, out)[trainer]
            result = {"trainer": trainer, "repeat": rep, **run_timed(cmd, env, cwd, out / "log.txt", BAR_DESC[trainer])}
            print(json.dumps(result), file=sys.stderr, flush=True)
            runs.append(result)
    medians, ratios = summarise(runs, trainers)
    setup = {k: str(v) for k, v in vars(args).items()}
    print(json.dumps({"setup": setup, "loadavg_before": load_before, "loadavg_after": load(), "runs": runs,
                      "medians": medians, "ratios": ratios, "skipped": {} if args.model == "sd15" else
                      {"kohya": "its UNet is hard-coded to SD 1.x widths (library/original_unet.py); sd15 only"}}, indent=1))
    print(markdown(medians, ratios))


if __name__ == "__main__":
    main()
