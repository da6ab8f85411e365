"""The caches check themselves: a damaged entry is named and rebuilt before training,
and one damaged during training is refused, never trained on."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load, save_file

from sdtune.data.cache import CHECKSUM_KEY, CachedDataset, cache_latents, cache_text, read_entry
from sdtune.data.plan import BucketSpec, plan_dataset
from sdtune.data.sources import Source
from sdtune.errors import DataError
from sdtune.export.kohya import read_lora
from sdtune.hashes import tensors_sha256
from sdtune.models import load_components
from sdtune.train import main

from conftest import SAMPLE

CPU = torch.device("cpu")


def _tensors(path):
    """An entry's tensors, copied out of the file: ``load_file`` maps it, and the tests rewrite it in place."""
    return load(path.read_bytes())


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_data_bytes(path):
    """Invert 4 bytes inside the tensor data (after the 8-byte length and the JSON header)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    middle = (start + len(data)) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    path.write_bytes(bytes(data))


def _strip_checksum(path):
    """The same tensors without sdtune's metadata, as an older sdtune (or another tool) wrote them."""
    save_file(_tensors(path), path)


def _rewrite(path, change):
    """Change an entry's tensors and give it a matching checksum: only the other checks can catch it."""
    tensors = change(_tensors(path))
    save_file(tensors, path, metadata={CHECKSUM_KEY: tensors_sha256(tensors)})


def _args(model, data, cache, out, *extra):
    settings = [
        f"model.path={model}", f"data.path={data}", f"data.cache_dir={cache}", f"output.dir={out}",
        "train.logger=none", "preview.prompts=[]", "data.validation_split=0", "train.max_steps=2",
        "train.deterministic=true", *extra,
    ]
    return ["--recipe", "recipes/tiny_demo.yaml", *[item for s in settings for item in ("--set", s)]]


def _caption_entry(model, data, cache):
    """The text entry of the first image's caption (not the empty caption's)."""
    parts = load_components(model, "v_prediction", True)
    caption = plan_dataset([Source(str(data))], BucketSpec(64, 16)).train[0].caption
    paths, _ = cache_text([caption], parts.tokenizer, parts.text_encoder, parts.text_encoder_sha256, cache, CPU, show_progress=False)
    return paths[0]


@pytest.fixture(scope="module")
def clean_run(tiny_v, tmp_path_factory):
    """A sound cache and the LoRA a run trains on it. The two entries the tests damage
    are encoded alone here, as a rebuild encodes them: the VAE's last bits depend on
    which images share its batch, so only then can the weights match exactly."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("clean")
    data, cache = root / "data", root / "cache"
    data.mkdir()
    for image in sorted(p for p in SAMPLE.iterdir() if p.suffix != ".txt")[:8]:
        shutil.copy(image, data / image.name)
        shutil.copy(image.with_suffix(".txt"), data / f"{image.stem}.txt")
    AcceleratorState._reset_state(reset_partial_state=True)  # this runs before the per-test reset (conftest)
    main(_args(tiny_v, data, cache, root / "fill", "train.max_steps=1"))
    latent = sorted((cache / "latents").rglob("*.safetensors"))[0]
    text = _caption_entry(tiny_v, data, cache)
    latent.unlink()
    text.unlink()
    AcceleratorState._reset_state(reset_partial_state=True)
    result = main(_args(tiny_v, data, cache, root / "out"))
    assert (result.latent_cache.encoded, result.text_cache.encoded) == (1, 1)
    return {"data": data, "cache": cache, "latent": latent.relative_to(cache), "text": text.relative_to(cache),
            "weights": read_lora(result.output)[0]}


DAMAGE = {  # which entry, how it is damaged, what the message says
    "truncated_latent": ("latent", _truncate, "unreadable"),
    "flipped_latent_bytes": ("latent", _flip_data_bytes, "checksum mismatch"),
    "flipped_text_bytes": ("text", _flip_data_bytes, "checksum mismatch"),
    "latent_without_checksum": ("latent", _strip_checksum, "no checksum"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_named_rebuilt_and_training_matches_a_clean_cache(clean_run, tiny_v, tmp_path, capsys, damage):
    kind, spoil, reason = DAMAGE[damage]
    cache = tmp_path / "cache"
    shutil.copytree(clean_run["cache"], cache)
    entry = cache / clean_run[kind]
    sound = _tensors(entry)
    spoil(entry)
    capsys.readouterr()

    result = main(_args(tiny_v, clean_run["data"], cache, tmp_path / "out"))

    out, err = capsys.readouterr()
    named = [line for line in err.splitlines() if str(entry) in line]
    assert len(named) == 1 and named[0].startswith("sdtune: ") and reason in named[0] and "rebuilt" in named[0]
    latent, text = result.latent_cache, result.text_cache
    if kind == "latent":
        assert (latent.encoded, latent.reused, latent.rebuilt, text.encoded, text.reused, text.rebuilt) == (1, 7, 1, 0, 9, 0)
        assert "latent cache 1 encoded, 7 reused, 0 invalidated, 1 rebuilt" in out
    else:
        assert (latent.encoded, latent.reused, latent.rebuilt, text.encoded, text.reused, text.rebuilt) == (0, 8, 0, 1, 8, 1)
        assert "text cache 1 encoded, 8 reused, 1 rebuilt" in out
    rebuilt = read_entry(entry)  # checksummed again
    assert rebuilt.keys() == sound.keys() and all(torch.equal(rebuilt[k], sound[k]) for k in sound)
    weights, expected = read_lora(result.output)[0], clean_run["weights"]
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.parametrize("change,reason", [
    pytest.param(lambda t: {**t, "mean": t["mean"].index_fill(0, torch.tensor([0]), float("nan"))}, "non-finite", id="nan"),
    pytest.param(lambda t: {**t, "std": t["std"][:, :-1].contiguous()}, "expected", id="wrong_shape"),
    pytest.param(lambda t: {k: v.half() for k, v in t.items()}, "float32", id="float16"),
    pytest.param(lambda t: {"mean": t["mean"]}, "expected", id="missing_std"),
])
def test_an_entry_with_a_valid_checksum_but_the_wrong_tensors_is_rebuilt(tiny_v, small_dataset, tmp_path, capsys, change, reason):
    vae = load_components(tiny_v, "v_prediction", True).vae
    plan = plan_dataset([Source(str(small_dataset))], BucketSpec(64, 16))
    paths, _ = cache_latents(plan.train, vae, "vae", tmp_path / "cache", CPU, show_progress=False)
    sound = _tensors(paths[2])
    _rewrite(paths[2], change)
    capsys.readouterr()
    _, stats = cache_latents(plan.train, vae, "vae", tmp_path / "cache", CPU, show_progress=False)
    err = capsys.readouterr().err
    assert (stats.encoded, stats.reused, stats.rebuilt) == (1, 7, 1)
    assert f"sdtune: cache entry {paths[2]} is unusable" in err and reason in err
    # Encoded alone now, in a batch of 8 before: the same up to the VAE's last bits.
    torch.testing.assert_close(read_entry(paths[2])["std"], sound["std"])


def test_each_process_checks_and_rebuilds_only_its_own_entries(tiny_v, small_dataset, tmp_path, capsys):
    vae = load_components(tiny_v, "v_prediction", True).vae
    plan = plan_dataset([Source(str(small_dataset))], BucketSpec(64, 16))
    cache = tmp_path / "cache"
    first = [cache_latents(plan.train, vae, "vae", cache, CPU, shard=(rank, 2), show_progress=False) for rank in (0, 1)]
    assert first[0][0] == first[1][0] and [s.encoded for _, s in first] == [4, 4]
    paths = first[0][0]
    _flip_data_bytes(paths[3])
    capsys.readouterr()
    again = [cache_latents(plan.train, vae, "vae", cache, CPU, shard=(rank, 2), show_progress=False)[1] for rank in (0, 1)]
    # Entry 3 is the second process's (every other distinct entry): it alone reports and rebuilds it.
    assert [(s.reused, s.rebuilt, s.encoded) for s in again] == [(4, 0, 0), (3, 1, 1)]
    assert capsys.readouterr().err.count(str(paths[3])) == 1
    read_entry(paths[3])


def test_an_entry_damaged_after_the_check_is_refused_when_read(tiny_v, small_dataset, tmp_path):
    parts = load_components(tiny_v, "v_prediction", True)
    plan = plan_dataset([Source(str(small_dataset))], BucketSpec(64, 16))
    cache = tmp_path / "cache"
    latents, _ = cache_latents(plan.train, parts.vae, "vae", cache, CPU, show_progress=False)
    captions = [i.caption for i in plan.train]
    text, _ = cache_text(captions, parts.tokenizer, parts.text_encoder, "te", cache, CPU, show_progress=False)
    assert len(set(text)) == len(text)
    dataset = CachedDataset(latents, text_paths=text)
    assert torch.equal(dataset[0]["mean"], _tensors(latents[0])["mean"])

    _flip_data_bytes(latents[1])
    with pytest.raises(DataError, match="run again") as refused:
        dataset[1]
    assert str(latents[1]) in str(refused.value)
    _truncate(text[2])
    with pytest.raises(DataError, match="run again") as refused:
        dataset[2]
    assert str(text[2]) in str(refused.value)

    # The next run's check rebuilds both, and they read again.
    _, latent_stats = cache_latents(plan.train, parts.vae, "vae", cache, CPU, show_progress=False)
    _, text_stats = cache_text(captions, parts.tokenizer, parts.text_encoder, "te", cache, CPU, show_progress=False)
    assert (latent_stats.rebuilt, text_stats.rebuilt) == (1, 1)
    assert dataset[1]["mean"].shape == dataset[1]["std"].shape and dataset[2]["encoder_hidden_states"].shape[0] == 77


def test_a_killed_runs_half_written_cache_entry_is_removed_at_the_next_start(tiny_v, small_dataset, tmp_path):
    import subprocess
    import sys

    from sdtune import atomic
    from sdtune.train import main

    from test_train import _args

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    bucket = tmp_path / "cache" / "latents" / "ab"
    bucket.mkdir(parents=True)
    stale = bucket / f".ab12.safetensors.{atomic.HOST}.{dead.pid}.tmp"
    stale.write_bytes(b"half an entry")
    main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=1"))
    assert not stale.exists()
