"""The scan before step 1: find every sample, check every file, bucket every image.

``plan_dataset`` returns what the cache and the loader need (one :class:`Item`
per trained view of an image, with its bucket and crop) or raises one error that
lists every problem by file, with the setting that would let training go on.
Nothing here touches a model, so ``sdtune data`` can show the same plan.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sdtune.data.buckets import make_buckets, nearest_bucket
from sdtune.data.captions import truncated, with_prefix
from sdtune.data.images import Crop, ImageInfo, inspect_image, place_crop
from sdtune.data.masks import check_mask, without_mask_files
from sdtune.data.sources import PROBLEM_KINDS, Problem, Sample, Source, find_samples
from sdtune.errors import DataError
from sdtune.recipe import DataSection

# Problems that make an image untrainable; data.on_bad_image decides what happens.
BAD_IMAGE = ("empty", "not_image", "unreadable", "caption_encoding", "too_small", "extreme_aspect", "no_mask", "bad_mask")
MIN_KEPT_FRACTION = 0.5  # a crop keeping less of the image than this is "extreme"


@dataclass(frozen=True)
class BucketSpec:
    resolution: int
    step: int = 64
    min_side: int | None = None  # default resolution / 2
    max_side: int | None = None  # default resolution * 2
    max_aspect_ratio: float = 2.0

    def buckets(self) -> list[tuple[int, int]]:
        return make_buckets(
            self.resolution,
            self.step,
            self.min_side or self.resolution // 2,
            self.max_side or self.resolution * 2,
            self.max_aspect_ratio,
        )


@dataclass(frozen=True)
class Item:
    """One trained view of an image: which bytes, which crop, which caption."""

    sample: Sample
    sha256: str  # of the image file's bytes
    crop: Crop
    size: tuple[int, int]  # the upright image's width, height before any resize

    @property
    def caption(self) -> str:
        return with_prefix(self.sample.caption, self.sample.prefix)


def size_conditioning(item: Item) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """What SDXL is told about a view's geometry (Podell et al. 2023, sections 2.2-2.3), each
    (height, width) or (y, x): the image's original size, the top-left corner of the cut in
    the resized image, and the size trained at (its bucket). A mirrored view is a cut of the
    mirrored image, whose left edge is as far from the right edge as the original cut's
    right edge was."""
    crop = item.crop
    width, height = crop.bucket
    left = crop.resized[0] - crop.left - width if crop.flip else crop.left
    return (item.size[1], item.size[0]), (crop.top, left), (height, width)


@dataclass
class DataPlan:
    train: list[Item]  # repeats and flipped copies included: one epoch
    validation: list[Item]  # held out; never trained on
    buckets: list[tuple[int, int]]  # every bucket there is, used or not
    sources: list[str]
    images: int  # distinct images trained on
    problems: list[Problem] = field(default_factory=list)  # all found, reported or skipped
    skipped: list[Problem] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # names of captions cut to the token limit
    masks: str = "none"  # data.masks: none | files | alpha


def plan_data(data: DataSection, seed: int, tokenizer=None, check: bool = True) -> DataPlan:
    """The recipe's data section as a scanned, bucketed plan (``train``, ``sdtune data``, ``sdtune cache``);
    ``check=False`` lists every problem in the plan instead of stopping (``sdtune data``)."""
    if data.sources:
        sources = [
            Source(**{**s.model_dump(), "caption_extensions": tuple(s.caption_extensions), "setting": f"data.sources[{i}].path"})
            for i, s in enumerate(data.sources)
        ]
    else:
        sources = [Source(data.path, setting="data.path")]
    spec = BucketSpec(data.resolution, data.bucket_step, data.bucket_min_side, data.bucket_max_side, data.max_aspect_ratio)
    return plan_dataset(
        sources,
        spec,
        missing_caption=data.missing_caption,
        on_bad_image=data.on_bad_image,
        max_upscale=data.max_upscale,
        crop=data.crop,
        flip=data.flip,
        validation_split=data.validation_split,
        split_seed=data.split_seed,
        seed=seed,
        tokenizer=tokenizer,
        check=check,
        masks=data.masks,
    )


def plan_dataset(
    sources: list[Source],
    spec: BucketSpec,
    *,
    missing_caption: str = "fail",
    on_bad_image: str = "fail",
    max_upscale: float = 1.0,
    crop: str = "center",
    flip: bool = False,
    validation_split: float = 0.0,
    split_seed: int = 0,
    seed: int = 0,
    tokenizer=None,
    threads: int | None = None,
    check: bool = True,
    masks: str = "none",
) -> DataPlan:
    """Scan ``sources`` and plan one epoch; raise ``ValueError`` listing every problem
    when ``on_bad_image`` is ``fail`` (or a caption is missing and
    ``missing_caption`` is ``fail``).

    ``crop``: ``center``, or ``random`` (one crop per image, drawn from ``seed`` and
    the image, so it can be cached). ``validation_split``: a fraction (< 1) or a
    count of images held out, chosen by ``split_seed`` alone so that runs with
    different training seeds are evaluated on the same images; class images (DreamBooth)
    are never held out. ``masks``: ``files`` checks each image's ``<stem>_mask.png``.
    """
    buckets = spec.buckets()
    samples: list[Sample] = []
    problems: list[Problem] = []
    for source in sources:
        found, seen = find_samples(source, missing_caption)
        samples += found
        problems += seen
    if masks == "files":
        samples, problems = without_mask_files(samples, problems)

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        inspected = list(pool.map(_inspect, samples))
    kept: list[tuple[Sample, str, ImageInfo, tuple[int, int]]] = []
    for sample, (digest, info) in zip(samples, inspected):
        if not isinstance(info, ImageInfo):
            problems.append(Problem(sample.name, *info))
            continue
        bucket = nearest_bucket(info.width, info.height, buckets)
        scale = max(bucket[0] / info.width, bucket[1] / info.height)
        kept_fraction = (bucket[0] * bucket[1]) / (info.width * scale * info.height * scale)
        if scale > max_upscale + 1e-9:
            problems.append(
                Problem(sample.name, "too_small", f"{info.width}x{info.height} would be upscaled x{scale:.2f} to its bucket {bucket[0]}x{bucket[1]}")
            )
        elif kept_fraction < MIN_KEPT_FRACTION:
            problems.append(
                Problem(sample.name, "extreme_aspect", f"{info.width}x{info.height}: its bucket {bucket[0]}x{bucket[1]} keeps {kept_fraction:.0%} of it")
            )
        elif masks == "files" and (mask_problem := check_mask(sample, info)) is not None:
            problems.append(mask_problem)
        else:
            kept.append((sample, digest, info, bucket))

    if check:
        _raise_for(problems, sources, on_bad_image)
        if not kept:
            lines = [f"no trainable images left in {', '.join(s.path for s in sources)}:", *format_problems(problems, sources)]
            raise DataError("\n".join(lines + _hints(problems)))

    held_out = _validation_names([s.name for s, *_ in kept if not s.is_class], validation_split, split_seed) if kept else set()
    train, validation = [], []
    for sample, digest, info, bucket in kept:
        x, y = (0.5, 0.5) if crop == "center" else _random_position(seed, digest, sample.name)
        base = Item(sample, digest, place_crop(info, bucket, x, y), (info.width, info.height))
        if sample.name in held_out:
            validation.append(base)
            continue
        views = [base, Item(sample, digest, place_crop(info, bucket, x, y, flip=True), base.size)] if flip else [base]
        train += views * sample.repeats
    train = with_class_balance(train)
    captions = list(dict.fromkeys(i.caption for i in train + validation))  # repeats share one count
    cut = {captions[i] for i in truncated(tokenizer, captions)} if tokenizer is not None else set()
    return DataPlan(
        train=train,
        validation=validation,
        buckets=buckets,
        sources=[s.path for s in sources],
        images=len(kept) - len(validation),
        problems=problems,
        skipped=[p for p in problems if p.kind in BAD_IMAGE],
        truncated=sorted({i.sample.name for i in train + validation if i.caption in cut}),
        masks=masks,
    )


def with_class_balance(train: list[Item]) -> list[Item]:
    """An epoch's instance items, then as many class items (DreamBooth prior preservation):
    the class items (repeats and mirrored views included) in scan order, cycled or cut to
    the instance count, as kohya's sd-scripts balances reg images. Fixed by the scan alone,
    so the bucket sampler's seeded order, and a resume mid-epoch, work on it unchanged."""
    instance = [i for i in train if not i.sample.is_class]
    cls = [i for i in train if i.sample.is_class]
    if not cls:
        return train
    if not instance:
        raise DataError("the data holds class images (class_images: true) but no instance images to train the subject on; "
                        "add a data source of the subject's images without class_images")
    return instance + [cls[k % len(cls)] for k in range(len(instance))]


def _inspect(sample: Sample) -> tuple[str, ImageInfo | tuple[str, str]]:
    try:
        data = sample.read()
    except OSError as exc:
        return "", ("unreadable", str(exc))
    return hashlib.sha256(data).hexdigest(), inspect_image(data)


def _random_position(seed: int, digest: str, name: str) -> tuple[float, float]:
    rng = random.Random(f"{seed}:{digest}:{name}")
    return rng.random(), rng.random()


def _validation_names(names: list[str], split: float, seed: int) -> set[str]:
    count = round(split * len(names)) if split < 1 else int(split)
    if count <= 0:
        return set()
    if count >= len(names):
        raise DataError(
            f"data.validation_split {split} holds out {count} of {len(names)} images, leaving none to train on; lower it"
        )
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return set(order[:count])


def _raise_for(problems: list[Problem], sources: list[Source], on_bad_image: str) -> None:
    bad = [p for p in problems if p.kind in BAD_IMAGE]
    uncaptioned = [p for p in problems if p.kind == "no_caption"]
    if not uncaptioned and (not bad or on_bad_image == "skip"):
        return
    shown = uncaptioned + (bad if on_bad_image == "fail" else [])
    lines = [f"the data scan found {len(shown)} problem(s); nothing was trained:"]
    lines += format_problems(shown, sources)
    if bad and on_bad_image == "fail":
        lines.append(
            "set data.on_bad_image: skip to train without the bad images (their list is written to the output folder)"
        )
    raise DataError("\n".join(lines + _hints(shown)))


def _hints(problems: list[Problem]) -> list[str]:
    kinds = {p.kind for p in problems}
    hints = []
    if "too_small" in kinds:
        hints.append("for small images: lower data.resolution, or allow upscaling with data.max_upscale (e.g. 2)")
    if "extreme_aspect" in kinds:
        hints.append("for elongated images: raise data.max_aspect_ratio, or crop them before training")
    if "no_caption" in kinds:
        hints.append("set data.missing_caption: empty (train with an empty caption) or filename (caption = file name)")
    return hints


def format_problems(problems: list[Problem], sources: list[Source], limit: int = 50) -> list[str]:
    """Problems grouped by kind, each file on its own line (the first ``limit`` of a kind)."""
    lines = []
    for kind, title in PROBLEM_KINDS.items():
        group = [p for p in problems if p.kind == kind]
        if not group:
            continue
        if kind == "no_caption":
            where = ", ".join(s.path for s in sources)
            lines.append(f"  {len(group)} image(s) in {where} have no caption file (<stem>.txt or .caption):")
        else:
            lines.append(f"  {title} ({len(group)}):")
        lines += [f"    {p.name}" + (f"  ({p.detail})" if p.detail else "") for p in group[:limit]]
        if len(group) > limit:
            lines.append(f"    ... and {len(group) - limit} more")
    return lines


def warnings_for(plan: DataPlan, token_limit: int = 77) -> list[str]:
    """What a run prints before step 1 (once each): skipped files, orphan captions, cut captions."""
    lines = []
    if plan.skipped:
        lines.append(f"skipping {len(plan.skipped)} bad image(s) (data.on_bad_image: skip):")
        lines += format_problems(plan.skipped, [], limit=10)
    orphans = [p for p in plan.problems if p.kind == "orphan_caption"]
    if orphans:
        lines.append(f"{len(orphans)} caption(s) have no image and are not used:")
        lines += format_problems(orphans, [], limit=10)
    if plan.truncated:
        shown = ", ".join(plan.truncated[:5]) + (f", ... and {len(plan.truncated) - 5} more" if len(plan.truncated) > 5 else "")
        lines.append(
            f"{len(plan.truncated)} caption(s) are longer than {token_limit} tokens and were cut to fit the text encoder: {shown}"
        )
    return lines


def skipped_report(plan: DataPlan) -> str:
    """The skipped list written next to a run's outputs: one tab-separated line per file."""
    return "".join(f"{p.name}\t{p.kind}\t{p.detail}\n" for p in plan.skipped)


def verdict(plan: DataPlan, missing_caption: str, on_bad_image: str) -> str | None:
    """Why a run with these settings would stop on ``plan`` (made with ``check=False``), or None."""
    uncaptioned = [p for p in plan.problems if p.kind == "no_caption"]
    bad = [p for p in plan.problems if p.kind in BAD_IMAGE]
    reasons = []
    if uncaptioned and missing_caption == "fail":
        reasons.append(f"{len(uncaptioned)} image(s) have no caption (set data.missing_caption: empty or filename)")
    if bad and on_bad_image == "fail":
        reasons.append(f"{len(bad)} bad image(s) (set data.on_bad_image: skip to train without them)")
    if not plan.train:
        reasons.append("no image is left to train on")
    return "a run with these settings would stop: " + "; ".join(reasons) if reasons else None


def summary(plan: DataPlan, width: int = 40) -> str:
    """The dataset in a few lines and a bucket histogram (``sdtune data``)."""
    counts = Counter(item.crop.bucket for item in plan.train)
    lines = [
        f"sources: {', '.join(plan.sources)}",
        f"images: {plan.images} trained, {len(plan.validation)} held out for validation, {len(plan.skipped)} skipped",
        f"items per epoch: {len(plan.train)} (repeats and flipped copies included)",
        f"buckets (width x height: items per epoch), {len(counts)} used of {len(plan.buckets)}:",
    ]
    classes = sum(item.sample.is_class for item in plan.train)
    if classes:
        lines.insert(3, f"  of which {classes} class images (DreamBooth prior preservation, weighted by train.prior_loss_weight)")
    if plan.masks != "none":
        lines.insert(len(lines) - 1, f"loss masks: {'<stem>_mask.png files' if plan.masks == 'files' else 'alpha channels'}")
    peak = max(counts.values(), default=1)
    for bucket in plan.buckets:
        n = counts.get(bucket, 0)
        if n:
            lines.append(f"  {bucket[0]:>5} x {bucket[1]:<5} {n:>7}  {'#' * max(1, round(n / peak * width))}")
    lines += warnings_for(plan)
    return "\n".join(lines)
