"""DreamBooth class images the folder lacks, drawn with the base model before the scan.

A class-image source (``class_images: true``) with ``class_prompt`` and
``num_class_images`` is filled up to that many images, as diffusers' DreamBooth script
does with ``--class_prompt`` / ``--num_class_images``: each missing image is drawn from
the base model with sdtune's own sampling (``sample.run_jobs``) and written with its
caption (the class prompt) and its A1111 parameters. Image ``k`` of a folder is drawn
from a seed made of train.seed, the prompt and ``k``, so the same recipe draws the same
images; a folder that already holds enough is left alone (the second run draws nothing).
Under several processes each draws a share of the missing images, batch by batch, so the
files are the same whatever the number of processes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm.auto import tqdm

from sdtune.atomic import write_text
from sdtune.data.sources import Source, image_files, resolve_kind
from sdtune.errors import DataError

SAMPLER, STEPS, CFG = "dpmpp_2m", 25, 7.0  # a deterministic sampler at settings that suit SD 1/2 bases
BATCH = 4


def class_image_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of a folder's ``index``-th class image: fixed by train.seed, the prompt and the index."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{prompt}:{index}".encode(), digest_size=4).digest(), "little") >> 1


def missing_class_images(folder: Path, count: int) -> list[str]:
    """The names (``class-00007``) of the images ``folder`` lacks to hold ``count``: the lowest free indices."""
    missing = count - len(image_files(folder))
    if missing <= 0:
        return []
    taken = {p.name.partition(".")[0] for p in folder.iterdir() if "." in p.name} if folder.is_dir() else set()  # class-00007.*
    return [name for name in (f"class-{k:05d}" for k in range(count * 2)) if name not in taken][:missing]


def shares(names: list[str], rank: int, processes: int) -> list[str]:
    """The names process ``rank`` of ``processes`` draws: every ``processes``-th batch of BATCH,
    starting at batch ``rank``. Each image is drawn in the same batch as one process would
    draw it, so the files are the same whatever the number of processes."""
    batches = [names[i : i + BATCH] for i in range(0, len(names), BATCH)]
    return [name for batch in batches[rank::processes] for name in batch]


def draw_class_images(folder: Path, prompt: str, names: list[str], size: int, seed: int, model_path: str,
                      allow_pickle: bool, device=None, progress: bool = True) -> None:
    """Draw the class images ``names`` of ``folder`` (``size`` px squares of ``prompt``), each with its caption."""
    from sdtune.infotext import save_png
    from sdtune.pipeline import load_pipeline  # diffusers' pipeline: imported only when images are drawn
    from sdtune.sample import Job, job_parameters, run_jobs
    from sdtune.samplers import default_cfg_rescale

    if not names:
        return
    folder.mkdir(parents=True, exist_ok=True)
    model = load_pipeline(model_path, device=device, allow_pickle=allow_pickle)
    jobs = {name: Job(prompt, "", SAMPLER, STEPS, CFG, default_cfg_rescale(model.zero_terminal_snr),
                      class_image_seed(seed, prompt, int(name.split("-")[1])), size, size) for name in names}
    with tqdm(total=len(names), desc=f"class images for {folder}", unit="image", disable=not progress) as bar:
        images = run_jobs([model], [(0, job) for job in jobs.values()], BATCH, bar)
    for name, job in jobs.items():
        write_text(folder / f"{name}.txt", prompt + "\n")  # the caption first: an image never lacks one
        save_png(images[(0, job)], folder / f"{name}.png", job_parameters(job, model))


def generate_class_images(folder: Path, prompt: str, count: int, size: int, seed: int, model_path: str, allow_pickle: bool) -> int:
    """Fill ``folder`` up to ``count`` images of ``prompt`` (``size`` px squares) in this process; returns how many were drawn."""
    folder = Path(folder)
    names = missing_class_images(folder, count)
    draw_class_images(folder, prompt, names, size, seed, model_path, allow_pickle)
    return len(names)


def fill_class_folders(sources, model_path: str, allow_pickle: bool, size: int, seed: int, accelerator) -> None:
    """Before the scan: draw the class images that data.sources ask for (``class_prompt``,
    ``num_class_images``) and their folders lack. Under several processes each draws its
    share (``shares``) on its own device while the others draw theirs."""
    wanted = [s for s in sources if s.class_images and s.num_class_images]
    todo = [(source, missing_class_images(Path(source.path), source.num_class_images)) for source in wanted]
    todo = [(source, names) for source, names in todo if names]
    if not todo:  # every process sees the same: nothing is written before the barrier below
        return
    # Mistakes that would stop the run after the drawing stop it before: a missing instance folder or base model.
    for i, source in enumerate(sources):
        if not source.class_images:
            resolve_kind(Source(source.path, source.kind, setting=f"data.sources[{i}].path"))
        elif source.num_class_images and Path(source.path).exists() and resolve_kind(Source(source.path, source.kind)) != "folder":
            raise DataError(f"data.sources[{i}] draws class images into {source.path}, which is not a folder of images with "
                            ".txt captions (a metadata table or a datasets folder would not list them); give it a folder of its own")
    if not Path(model_path).exists():
        raise FileNotFoundError(f"model.path {model_path} does not exist; class images are drawn with the base model: point "
                                "it at a diffusers model folder or a single-file .safetensors checkpoint")
    accelerator.wait_for_everyone()  # every process has listed what is missing before any writes
    processes = accelerator.num_processes
    for source, names in todo:
        draw_class_images(Path(source.path), source.class_prompt, shares(names, accelerator.process_index, processes), size,
                          seed, model_path, allow_pickle, accelerator.device, progress=accelerator.is_main_process)
        if accelerator.is_main_process:
            by = f" ({processes} processes drew a share each)" if processes > 1 else ""
            print(f"sdtune: drew {len(names)} class image(s) of {source.class_prompt!r} into {source.path}{by}")
    accelerator.wait_for_everyone()
