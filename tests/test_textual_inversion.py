"""Textual inversion: only the new token's rows train; the file loads in A1111, ComfyUI and
diffusers as their loaders read it; sampling uses it; resume and mistakes behave."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import ROOT, SAMPLE
from sdtune.errors import DataError, RecipeError
from sdtune.models import load_components
from sdtune.recipe import load_recipe, recipe_from_dict
from sdtune.textual_inversion import NewTokenRows, new_rows, read_embedding
from sdtune.train import train

RECIPE = ROOT / "recipes" / "textual_inversion.yaml"


def _data(tmp_path, caption: str = "a photo of zwx, {}", count: int = 4):
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[:count]:
        shutil.copy(image, folder / image.name)
        (folder / f"{image.stem}.txt").write_text(caption.format(image.with_suffix(".txt").read_text().strip()))
    return folder


def _sets(model, data, out, *extra) -> list[str]:
    return [f"model.path={model}", f"data.path={data}", f"data.cache_dir={out.parent / 'cache'}", f"output.dir={out}",
            "output.name=zwx", "embedding.token=zwx", "embedding.init_word=cat", "embedding.vectors=2",
            "train.logger=none", "train.mixed_precision=no", "train.gradient_checkpointing=false", "data.num_workers=0",
            "data.resolution=64", "train.batch_size=2", "train.lr_warmup_steps=0", "train.learning_rate=0.05",
            "train.max_steps=4", *extra]


# -- What the UIs' loaders accept, restated from their code -------------------------------------

def a1111_reads(tensors: dict, model_width: int, sdxl: bool) -> torch.Tensor | dict:
    """A1111 modules/textual_inversion/textual_inversion.py: load_from_file reads a .safetensors with
    safetensors.torch.load_file; create_embedding_from_data takes a dict with 'clip_g' and 'clip_l' as an
    SDXL embedding (width = both widths summed, vectors = clip_g's rows), else a dict of exactly one tensor
    (asserted; a 1-D one is unsqueezed); the embedding is registered only if its width is the model's
    (get_expected_shape: SDXL's two encoder widths summed), else skipped."""
    assert "string_to_param" not in tensors
    if "clip_g" in tensors and "clip_l" in tensors:
        width, vectors = tensors["clip_g"].shape[-1] + tensors["clip_l"].shape[-1], tensors["clip_g"].shape[0]
        assert sdxl and width == model_width and tensors["clip_l"].shape[0] == vectors
        return tensors
    assert not sdxl and len(tensors) == 1, "A1111: 'embedding file has multiple terms in it'"
    emb = next(iter(tensors.values()))
    emb = emb.unsqueeze(0) if emb.ndim == 1 else emb
    assert emb.shape[-1] == model_width, "A1111 would skip it (shape mismatch)"
    return emb


def comfyui_reads(tensors: dict, embed_key: str, width: int) -> torch.Tensor:
    """ComfyUI comfy/sd1_clip.py load_embed: no 'string_to_param', not a list: embed[embed_key] when the
    key is there (SD1/SDXL CLIP-L 'clip_l', SD2 'clip_h', SDXL bigG 'clip_g'), else the first tensor; each
    row of a 2-D tensor is one token, used only when its length is the encoder's width
    (set_up_textual_embeddings), else ignored with a warning."""
    emb = tensors[embed_key] if embed_key in tensors else next(iter(tensors.values()))
    rows = [emb] if emb.ndim == 1 else [emb[i] for i in range(emb.shape[0])]
    assert all(row.shape[0] == width for row in rows), "ComfyUI would ignore it (shape mismatch)"
    return torch.stack(rows)


# -- SD 1: one run, looked at from every side ----------------------------------------------------

@pytest.fixture(scope="module")
def sd1_run(tiny_eps, tmp_path_factory):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a module fixture runs before conftest's per-test reset
    tmp = tmp_path_factory.mktemp("ti")
    result = train(load_recipe(RECIPE, _sets(tiny_eps, _data(tmp), tmp / "out")))
    return tiny_eps, result


def test_only_the_new_rows_change(sd1_run):
    model, result = sd1_run
    base = load_components(model, "epsilon", False)
    for name, value in base.unet.state_dict().items():
        assert torch.equal(result.unet.state_dict()[name], value), name
    trained = result.text_encoder.state_dict()
    (rows_key,) = [k for k in trained if k.endswith("token_embedding.rows")]
    assert set(trained) - {rows_key} == {k.replace("token_embedding.weight", "token_embedding.base.weight")
                                        for k in base.text_encoder.state_dict()}
    for name, value in base.text_encoder.state_dict().items():  # the whole vocabulary's rows included
        assert torch.equal(trained[name.replace("token_embedding.weight", "token_embedding.base.weight")], value), name
    assert [n for n, p in result.text_encoder.named_parameters() if p.requires_grad] == [rows_key]
    assert result.text_cache is None  # the text encoder ran in every step
    assert not any(p.requires_grad for p in result.unet.parameters())


def test_the_loss_reaches_the_new_rows(sd1_run):
    model, result = sd1_run
    base = load_components(model, "epsilon", False)
    cat = base.text_encoder.get_input_embeddings().weight[base.tokenizer("cat", add_special_tokens=False).input_ids[0]]
    (rows,) = new_rows(result.text_encoder)
    assert rows.tokens == ["zwx", "zwx_1"] and rows.rows.dtype == torch.float32
    assert all((row - cat).abs().max() > 1e-3 for row in rows.rows.detach())  # both vectors moved from the init word

    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    timestep = torch.tensor([500])
    noisy = base.noise_scheduler.add_noise(latents, noise, timestep)
    base.tokenizer.add_tokens(rows.tokens)  # ids 49408 and 49409, as in training

    def loss(caption: str, vectors: torch.Tensor) -> float:
        with torch.no_grad():
            saved = rows.rows.detach().clone()
            rows.rows.copy_(vectors)
            ids = base.tokenizer(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
            hidden = result.text_encoder(ids)[0]
            rows.rows.copy_(saved)
            return torch.nn.functional.mse_loss(result.unet(noisy, timestep, hidden).sample, noise).item()

    trained, init = rows.rows.detach().clone(), cat.expand(2, -1)
    assert loss("a photo of zwx zwx_1", trained) != loss("a photo of zwx zwx_1", init)
    assert loss("a photo of a cat", trained) == loss("a photo of a cat", init)  # without the word: no effect


def test_the_file_loads_as_a1111_comfyui_and_diffusers_read_it(sd1_run):
    from diffusers import StableDiffusionPipeline

    model, result = sd1_run
    (rows,) = new_rows(result.text_encoder)
    tensors = load_file(result.output)  # what both UIs call
    assert set(tensors) == {"emb_params"} and tensors["emb_params"].shape == (2, 32)
    assert torch.equal(a1111_reads(tensors, 32, sdxl=False), rows.rows.detach())
    assert torch.equal(comfyui_reads(tensors, "clip_l", 32), rows.rows.detach())
    _, metadata = read_embedding(result.output)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert (metadata["step"], metadata["sdtune.token"], metadata["sdtune.vectors"]) == ("4", "zwx", "2")

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(result.output), token="zwx")
    ids = pipe.tokenizer.convert_tokens_to_ids(["zwx", "zwx_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], rows.rows.detach())
    assert pipe.maybe_convert_prompt("a zwx", pipe.tokenizer) == "a zwx zwx_1"


def test_sampling_with_the_embedding_changes_only_prompts_that_name_it(sd1_run, tmp_path):
    from sdtune.sample import main as sample, parse_embedding_arg

    model, result = sd1_run
    assert parse_embedding_arg(f"{result.output}:other") == (str(result.output), "other")
    assert parse_embedding_arg(str(result.output)) == (str(result.output), None)

    infotexts = []

    def draw(folder, *embedding) -> list[np.ndarray]:
        paths = sample(["--model", str(model), *embedding, "--prompt", "a photo of zwx", "--prompt", "a photo of a cat",
                        "--seed", "3", "--steps", "4", "--size", "64x64", "--sampler", "euler", "--out", str(tmp_path / folder)])
        infotexts.extend(Image.open(p).info["parameters"] for p in paths)
        return [np.asarray(Image.open(p), dtype=np.int16) for p in paths]

    (with_token, without_token), (plain_token, plain_cat) = draw("ti", "--embedding", str(result.output)), draw("base")
    assert np.abs(with_token - plain_token).max() > 0  # the file's stem, zwx, is the token
    assert np.array_equal(without_token, plain_cat)
    short_hash = hashlib.sha256(result.output.read_bytes()).hexdigest()[:12]  # A1111's TI hash
    assert f'TI hashes: "zwx: {short_hash}"' in infotexts[0] and "TI hashes" not in "".join(infotexts[1:])


# -- SDXL: both encoders' rows ---------------------------------------------------------------------

def test_sdxl_trains_and_writes_clip_l_and_clip_g(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdtune.sdxl import split_text_encoders

    result = train(load_recipe(RECIPE, _sets(tiny_sdxl, _data(tmp_path), tmp_path / "out", "train.max_steps=2")))
    first, second = split_text_encoders(result.text_encoder)
    trained = {"clip_l": new_rows(first)[0].rows.detach(), "clip_g": new_rows(second)[0].rows.detach()}
    tensors = load_file(result.output)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (2, 32), "clip_g": (2, 64)}  # tiny widths
    assert a1111_reads(tensors, 32 + 64, sdxl=True) is tensors
    for key, width in (("clip_l", 32), ("clip_g", 64)):
        assert torch.equal(comfyui_reads(tensors, key, width), trained[key])
    base = load_components(tiny_sdxl, "epsilon", False)
    for encoder, trained_encoder, key in ((base.text_encoder, first, "clip_l"), (base.text_encoder_2, second, "clip_g")):
        cat = encoder.get_input_embeddings().weight[base.tokenizer("cat", add_special_tokens=False).input_ids[0]]
        assert (trained[key] - cat).abs().max() > 1e-3, key
        assert torch.equal(trained_encoder.get_input_embeddings().base.weight, encoder.get_input_embeddings().weight)
    assert read_embedding(result.output)[1]["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"

    from sdtune.sample import main as sample

    images = {}
    for name, embedding in (("with", ["--embedding", str(result.output)]), ("without", [])):
        paths = sample(["--model", str(tiny_sdxl), *embedding, "--prompt", "zwx", "--seed", "1", "--steps", "2",
                        "--size", "64x64", "--sampler", "euler", "--out", str(tmp_path / name)])
        images[name] = np.asarray(Image.open(paths[0]), dtype=np.int16)
    assert np.abs(images["with"] - images["without"]).max() > 0

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)  # as diffusers documents SDXL embeddings
    pipe.load_textual_inversion(tensors["clip_l"], token="zwx", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token="zwx", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    for encoder, tokenizer, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"), (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):
        ids = tokenizer.convert_tokens_to_ids(["zwx", "zwx_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], trained[key])


# -- Resume, the command line, mistakes ---------------------------------------------------------------

def test_resume_ends_where_an_uninterrupted_run_ends_with_small_checkpoints(tiny_eps, tmp_path):
    data = _data(tmp_path)
    sets = _sets(tiny_eps, data, tmp_path / "out", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "train.deterministic=true")
    whole = load_file(train(load_recipe(RECIPE, sets)).output)["emb_params"]
    step2 = tmp_path / "out" / "checkpoints" / "zwx" / "step-00000002"
    (only,) = load_file(step2 / "trainable.safetensors")  # the rows, not the model
    assert only.startswith("text_encoder.") and only.endswith("token_embedding.rows")
    assert (step2 / "trainable.safetensors").stat().st_size < 4096 and (step2 / "optimizer.bin").stat().st_size < 8192
    resumed = load_file(train(load_recipe(RECIPE, sets), resume=str(step2)).output)["emb_params"]
    assert torch.equal(resumed, whole)


def test_the_cli_trains_an_embedding_end_to_end(tiny_sd2_v, tmp_path, capsys):
    from sdtune.cli import main

    sets = _sets(tiny_sd2_v, _data(tmp_path), tmp_path / "out", "model.prediction_type=v_prediction", "embedding.vectors=1",
                 "ema.enabled=true", "ema.decay=0.5", "checkpoint.every_steps=2", "preview.prompts=[a photo of zwx]", "preview.steps=2",
                 "data.validation_split=1", "validation.every_steps=2")
    assert main(["train", "--recipe", str(RECIPE), *[a for s in sets for a in ("--set", s)]]) == 0
    out = tmp_path / "out" / "zwx.safetensors"
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "validation loss" in printed  # a held-out caption names the word too
    assert (tmp_path / "out" / "previews" / "zwx" / "step-000004.png").is_file()  # drawn with the new word
    ema = torch.load(tmp_path / "out" / "checkpoints" / "zwx" / "step-00000002" / "ema.pt", weights_only=True)
    assert [tuple(p.shape) for p in ema["shadow_params"]] == [(1, 32)]  # EMA of the new row alone
    assert main(["inspect", str(out)]) == 0
    assert "zwx.safetensors: textual-inversion embedding, 1 vector(s) (emb_params 32 wide)" in capsys.readouterr().out
    tensors = load_file(out)
    assert a1111_reads(tensors, 32, sdxl=False).shape == (1, 32)
    assert comfyui_reads(tensors, "clip_h", 32).shape == (1, 32)  # SD 2's key is absent: the first tensor
    assert read_embedding(out)[1]["modelspec.architecture"] == "stable-diffusion-v2-768-v/textual-inversion"


def test_mistakes_say_what_to_change(tiny_eps, tmp_path, capsys):
    with pytest.raises(RecipeError, match=r"lora.rank: train.method: textual_inversion trains only the new token"):
        recipe_from_dict({"train": {"method": "textual_inversion"}, "lora": {"rank": 8}})
    with pytest.raises(RecipeError, match=r"train.text_encoder_steps is for a trained text encoder; .* remove it"):
        recipe_from_dict({"train": {"method": "textual_inversion", "text_encoder_steps": 10}})
    with pytest.raises(RecipeError, match=r"embedding.vectors is a textual-inversion setting; set train.method"):
        recipe_from_dict({"embedding": {"vectors": 4}})
    with pytest.raises(RecipeError, match="one word without spaces"):
        recipe_from_dict({"train": {"method": "textual_inversion"}, "embedding": {"token": "my cat"}})
    assert recipe_from_dict({"train": {"method": "textual_inversion"}, "output": {"name": "zwx"}}).embedding.token == "zwx"
    recipe = load_recipe(RECIPE)
    assert recipe_from_dict(recipe.model_dump(mode="json")) == recipe  # a resolved recipe loads again

    data = _data(tmp_path, caption="a photo of {}")
    with pytest.raises(DataError, match=r"embedding.token 'zwx' is in none of the 4 training captions.*data.sources\[\]\.prefix"):
        train(load_recipe(RECIPE, _sets(tiny_eps, data, tmp_path / "a")))
    from sdtune.cli import main  # the same mistake on the command line: one paragraph, exit status 2

    assert main(["train", "--recipe", str(RECIPE), *[a for s in _sets(tiny_eps, data, tmp_path / "a2") for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "sdtune: error: embedding.token 'zwx' is in none" in err and "Traceback" not in err
    data = _data(tmp_path / "x", caption="a photo of dog")
    with pytest.raises(RecipeError, match=r"embedding.token 'dog' is already a word of the tokenizer's vocabulary \('dog</w>'\)"):
        train(load_recipe(RECIPE, _sets(tiny_eps, data, tmp_path / "b", "embedding.token=dog")))
    data = _data(tmp_path / "y")
    with pytest.raises(RecipeError, match=r"init_word 'a tabby cat' is \d+ tokens .* embedding.vectors is 2"):
        train(load_recipe(RECIPE, _sets(tiny_eps, data, tmp_path / "c", "embedding.init_word=a tabby cat")))


def test_new_token_rows_read_the_base_table_below_the_vocabulary():
    base = torch.nn.Embedding(5, 3)
    rows = NewTokenRows(base, torch.ones(2, 3), ["t", "t_1"])
    out = rows(torch.tensor([[0, 4, 5, 6]]))
    assert torch.equal(out[0, :2], base.weight[[0, 4]]) and torch.equal(out[0, 2:], torch.ones(2, 3))
    out.sum().backward()
    assert base.weight.grad is None and torch.equal(rows.rows.grad, torch.ones(2, 3))


def test_frozen_weights_are_stored_in_the_mixed_precision_dtype_and_the_rows_in_fp32(tiny_eps, tmp_path):
    result = train(load_recipe(RECIPE, _sets(tiny_eps, _data(tmp_path, count=2), tmp_path / "out", "train.mixed_precision=bf16",
                                             "train.max_steps=1", "train.batch_size=1")))
    (rows,) = new_rows(result.text_encoder)
    assert {p.dtype for p in result.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in result.text_encoder.named_parameters() if not n.endswith(".rows")} == {torch.bfloat16}
    assert rows.rows.dtype == torch.float32 and load_file(result.output)["emb_params"].dtype == torch.float32


def test_two_processes_train_the_rows_like_one(tiny_eps, tmp_path):
    """Two CPU processes (DDP over the rows alone: the frozen UNet is not wrapped, which DDP
    refuses) train what one process does with their batches as accumulation steps."""
    import subprocess

    from conftest import cpu_processes

    data = _data(tmp_path)
    common = ("train.deterministic=true", "train.batch_size=1", "train.max_steps=3")
    one = train(load_recipe(RECIPE, _sets(tiny_eps, data, tmp_path / "one", *common, "train.gradient_accumulation_steps=2"))).output
    args = [a for s in _sets(tiny_eps, data, tmp_path / "two", *common) for a in ("--set", s)]
    command, env = cpu_processes(2, str(ROOT / "sdtune" / "train.py"), "--recipe", str(RECIPE), *args)
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = load_file(one)["emb_params"], load_file(tmp_path / "two" / "zwx.safetensors")["emb_params"]
    init = load_components(tiny_eps, "epsilon", False).text_encoder.get_input_embeddings().weight[2368]  # "cat"
    assert (one - init).abs().max() > 1e-2 and (two - one).abs().max() < 1e-5, (two - one).abs().max()


def test_the_rows_start_from_the_init_tokens_and_pooling_stays_at_the_end_token(tiny_sdxl, tmp_path):
    from sdtune.data.plan import plan_data
    from sdtune.data.captions import tokenize
    from sdtune.textual_inversion import add_embedding

    parts = load_components(tiny_sdxl, "epsilon", False)
    for encoder in (parts.text_encoder, parts.text_encoder_2):  # as the configs of SDXL's own repository say
        encoder.config.eos_token_id = 2
        for module in encoder.modules():
            if "eos_token_id" in vars(module):
                module.eos_token_id = 2
    plan = plan_data(recipe_from_dict({"data": {"path": str(_data(tmp_path, "{} in the style of ZWX")), "resolution": 64}}).data, 0)
    tables = [e.get_input_embeddings().weight.detach().clone() for e in (parts.text_encoder, parts.text_encoder_2)]
    spelt = add_embedding(parts, plan, "zwx", "a big cat", 4)
    assert all(item.caption.endswith("in the style of zwx zwx_1 zwx_2 zwx_3") for item in spelt.train)  # any case names it
    init = parts.tokenizer("a big cat", add_special_tokens=False).input_ids
    assert len(init) == 3
    for encoder, table in zip((parts.text_encoder, parts.text_encoder_2), tables):
        (rows,) = new_rows(encoder)  # vector i from init token i*3//4, as A1111 spreads them
        assert torch.equal(rows.rows, table[[init[0], init[0], init[1], init[2]]])
    ids = tokenize(parts.tokenizer_2, [spelt.train[0].caption])
    with torch.no_grad():
        out = parts.text_encoder_2(ids, output_hidden_states=True)
        end = (ids[0] == parts.tokenizer_2.eos_token_id).nonzero()[0, 0]
        expected = parts.text_encoder_2.text_projection(out.last_hidden_state[0, end])
    assert torch.allclose(out.text_embeds[0], expected)  # not at the new ids, the highest in the prompt

    from diffusers import StableDiffusionXLPipeline

    from sdtune.textual_inversion import load_into_pipeline

    file = tmp_path / "zwx.safetensors"
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}, file)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    for module in pipe.text_encoder_2.modules():
        if "eos_token_id" in vars(module):
            module.eos_token_id = 2
    assert load_into_pipeline(pipe, file) == "zwx"  # the file's stem
    assert {m.eos_token_id for m in pipe.text_encoder_2.modules() if "eos_token_id" in vars(m)} == {49407}


def test_an_a1111_pt_embedding_is_read_only_when_pickles_are_allowed(tmp_path):
    from sdtune.errors import ModelFileError

    vectors = torch.randn(3, 32)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "zqv", "step": 7,
                "sd_checkpoint": "0123456789", "sd_checkpoint_name": "base"}, tmp_path / "zqv.pt")  # as A1111 saves one
    with pytest.raises(ModelFileError, match="is a pickle: .*--allow-pickle"):
        read_embedding(tmp_path / "zqv.pt")
    tensors, _ = read_embedding(tmp_path / "zqv.pt", allow_pickle=True)
    assert list(tensors) == ["emb_params"] and torch.equal(tensors["emb_params"], vectors)
