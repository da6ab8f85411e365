"""DreamBooth class images the folder lacks, drawn with the base model before the scan.

A class-image source (``class_images: true``) with ``class_prompt`` and
``num_class_images`` is filled up to that many images, as diffusers' DreamBooth script
does with ``--class_prompt`` / ``--num_class_images``: each missing image is drawn from
the base model with sdtune's own sampling (``sample.run_jobs``) and written with its
caption (the class prompt) and its A1111 parameters. Image ``k`` of a folder is drawn
from a seed made of train.seed, the prompt and ``k``, so the same recipe draws the same
images; a folder that already holds enough is left alone (the second run draws nothing).
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


def generate_class_images(folder: Path, prompt: str, count: int, size: int, seed: int, model_path: str, allow_pickle: bool) -> int:
    """Fill ``folder`` up to ``count`` images of ``prompt`` (``size`` px squares); returns how many were drawn."""
    from sdtune.pipeline import load_pipeline  # diffusers' pipeline: imported only when images are drawn
    from sdtune.infotext import save_png
    from sdtune.sample import Job, job_parameters, run_jobs
    from sdtune.samplers import default_cfg_rescale

    folder = Path(folder)
    missing = count - len(image_files(folder))
    if missing <= 0:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    model = load_pipeline(model_path, allow_pickle=allow_pickle)
    names = [f"class-{k:05d}" for k in range(count * 2) if not any(folder.glob(f"class-{k:05d}.*"))][:missing]
    jobs = {name: Job(prompt, "", SAMPLER, STEPS, CFG, default_cfg_rescale(model.zero_terminal_snr),
                      class_image_seed(seed, prompt, int(name.split("-")[1])), size, size) for name in names}
    with tqdm(total=missing, desc=f"class images for {folder}", unit="image") as bar:
        images = run_jobs([model], [(0, job) for job in jobs.values()], BATCH, bar)
    for name, job in jobs.items():
        write_text(folder / f"{name}.txt", prompt + "\n")  # the caption first: an image never lacks one
        save_png(images[(0, job)], folder / f"{name}.png", job_parameters(job, model))
    return missing


def fill_class_folders(sources, model_path: str, allow_pickle: bool, size: int, seed: int, accelerator) -> None:
    """Before the scan: draw the class images that data.sources ask for (``class_prompt``,
    ``num_class_images``) and their folders lack, on the main process while the others wait."""
    wanted = [s for s in sources if s.class_images and s.num_class_images]
    if wanted and any(len(image_files(Path(s.path))) < s.num_class_images for s in wanted):
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
    if wanted and accelerator.is_main_process:
        for source in wanted:
            drawn = generate_class_images(Path(source.path), source.class_prompt, source.num_class_images, size, seed,
                                          model_path, allow_pickle)
            if drawn:
                print(f"sdtune: drew {drawn} class image(s) of {source.class_prompt!r} into {source.path}")
    if wanted:
        accelerator.wait_for_everyone()
