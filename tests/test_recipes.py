"""Recipes: every shipped file validates; mistakes fail early with a message that helps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from sdtune.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_the_required_recipes_ship():
    names = {p.name for p in RECIPES}
    assert {"tiny_demo.yaml", "lora_eps.yaml", "lora_vpred.yaml", "full_finetune.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_round_trips(path):
    recipe = load_recipe(path)
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    # A recipe states what it means: every key it sets is a real field (no silent defaults).
    raw = yaml.safe_load(path.read_text())
    for section, fields in raw.items():
        for key, value in fields.items():
            found = getattr(getattr(recipe, section), key)
            if isinstance(value, list) and found and isinstance(found[0], BaseModel):  # data.sources: what each item sets
                found = [item.model_dump(exclude_unset=True) for item in found]
            assert found == value or key == "prediction_type"


def test_recipe_intents():
    vpred = load_recipe(ROOT / "recipes/lora_vpred.yaml")
    assert (vpred.model.prediction_type, vpred.model.zero_terminal_snr, vpred.train.min_snr_gamma) == ("v_prediction", True, 5.0)
    assert load_recipe(ROOT / "recipes/lora_eps.yaml").model.prediction_type == "epsilon"
    assert load_recipe(ROOT / "recipes/full_finetune.yaml").train.method == "full"
    demo = load_recipe(ROOT / "recipes/tiny_demo.yaml")
    assert (demo.model.prediction_type, demo.model.zero_terminal_snr, demo.train.method) == ("v_prediction", True, "lora")
    assert demo.train.min_snr_gamma == 5.0


def test_misspelled_key_is_named_with_the_closest_valid_one(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  learnig_rate: 1.0e-4\n")
    with pytest.raises(RecipeError, match=r"unknown key 'train\.learnig_rate'; did you mean 'train\.learning_rate'"):
        load_recipe(path)
    path.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(RecipeError, match=r"unknown key 'trian'; did you mean 'train'"):
        load_recipe(path)


def test_set_overrides_any_field_with_typed_values(tmp_path):
    recipe = load_recipe(
        ROOT / "recipes/tiny_demo.yaml",
        ["train.learning_rate=5e-5", "lora.text_encoder=true", "lora.preset=custom", "lora.target_modules=[to_q, to_v]", "output.name=x"],
    )
    assert recipe.train.learning_rate == 5e-5
    assert recipe.lora.text_encoder is True
    assert recipe.lora.target_modules == ["to_q", "to_v"]
    assert recipe.output.name == "x"
    with pytest.raises(RecipeError, match=r"unknown key 'train\.max_step'; did you mean 'train\.max_steps'"):
        load_recipe(None, ["train.max_step=3"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["train.max_steps"])


def test_cross_field_rules_are_checked_at_load():
    with pytest.raises(RecipeError, match="zero_terminal_snr needs model.prediction_type: v_prediction"):
        recipe_from_dict({"model": {"prediction_type": "epsilon", "zero_terminal_snr": True}})
    with pytest.raises(RecipeError, match="needs train.method: lora"):
        recipe_from_dict({"train": {"method": "full"}, "lora": {"text_encoder": True}})
    with pytest.raises(RecipeError, match="cannot be loaded by the UIs"):
        recipe_from_dict({"lora": {"text_encoder_target_modules": ["q_proj", "layer_norm1"]}})
    with pytest.raises(RecipeError, match="data.resolution: .*multiple of 8"):
        recipe_from_dict({"data": {"resolution": 500}})
    assert recipe_from_dict({"model": {"prediction_type": "v"}}).model.prediction_type == "v_prediction"


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_field_is_documented_in_code_and_in_docs():
    docs = (ROOT / "docs/recipes.md").read_text(encoding="utf-8")
    for dotted, field in _fields(Recipe):
        assert field.description, f"{dotted} has no description"
        assert f"`{dotted}`" in docs, f"docs/recipes.md does not document {dotted}"


def test_docs_field_reference_is_current():
    from sdtune.recipe import reference_markdown

    assert reference_markdown() in (ROOT / "docs/recipes.md").read_text(encoding="utf-8"), "run: python -m sdtune.recipe.reference"


def test_option_combinations_that_make_no_sense_are_rejected():
    with pytest.raises(RecipeError, match="two loss weightings; choose one"):
        recipe_from_dict({"train": {"min_snr_gamma": 5.0, "debiased_estimation": True}})
    with pytest.raises(RecipeError, match="min_timestep .* must be below train.max_timestep"):
        recipe_from_dict({"train": {"min_timestep": 500, "max_timestep": 400}})
    with pytest.raises(RecipeError, match="prodigy .* around 1.0"):
        recipe_from_dict({"train": {"optimizer": "prodigy", "learning_rate": 1e-4}})
    with pytest.raises(RecipeError, match="train.loss_type"):
        recipe_from_dict({"train": {"loss_type": "l3"}})


# Each recipe for the user's own model and data, with the tiny model of its kind.
USER_RECIPES = {"lora_eps.yaml": "tiny_eps", "lora_vpred.yaml": "tiny_sd2_v", "full_finetune.yaml": "tiny_eps", "lora_sdxl.yaml": "tiny_sdxl",
                "textual_inversion.yaml": "tiny_eps"}
USER_RECIPES |= {"lora_dora.yaml": "tiny_eps", "lokr.yaml": "tiny_eps"}  # DoRA, and LyCORIS' LoKr


def test_every_recipe_is_covered_by_a_run():
    # The demo runs in test_demo.py, the trained base's recipe in test_tiny_base.py (a short build); recipes that need
    # more than a folder of images run in the tests of their feature (class images drawn, masks beside the images).
    own_tests = {"dreambooth.yaml": "test_prior_preservation.py", "masked_lora.yaml": "test_masked_loss.py"}
    assert set(USER_RECIPES) | {"tiny_demo.yaml", "tiny_base.yaml"} | set(own_tests) == {p.name for p in RECIPES}
    assert all(name in (ROOT / "tests" / test).read_text() for name, test in own_tests.items())


def _large_images(folder: Path, side: int, count: int = 1) -> Path:
    """Sample images enlarged to ``side`` px, big enough for a recipe's resolution without upscaling."""
    from PIL import Image

    folder.mkdir()
    for image in sorted(p for p in (ROOT / "datasets" / "sample").iterdir() if p.suffix == ".png")[:count]:
        with Image.open(image) as im:
            im.convert("RGB").resize((side, side), Image.Resampling.NEAREST).save(folder / image.name)
        (folder / f"{image.stem}.txt").write_text(image.with_suffix(".txt").read_text())
    return folder


@pytest.mark.parametrize("name", sorted(USER_RECIPES))
def test_shipped_recipe_runs_with_only_model_and_data_paths_set(name, request, tmp_path):
    """As shipped, with model.path and data.path pointed at a tiny model of the recipe's
    kind and an image of its size: 1 step of one image, and the recipe's output.
    Everything else, optimizer, gradient checkpointing, schedule and resolution
    included, is the recipe's own (batch size and accumulation are tested at 64 px
    in test_train.py; here they would multiply the time of the recipes' 512-1024 px
    steps), but for two settings. The recipes ask for bf16, and on a CPU
    without native bf16 (CI's: AVX2 only) PyTorch's bf16 convolutions are 13 to
    39 times slower than fp32 (docs/benchmarks.md), so this runs fp32;
    bf16 itself is tested at 64 px in test_train.py. And a warm-up's first step has
    learning rate 0, so this one step runs without warm-up (warm-up is tested in
    test_train.py) and must move the weights."""
    from sdtune.export.checkpoint import read_checkpoint
    from sdtune.export.kohya import read_lora
    from sdtune.train import train

    model = request.getfixturevalue(USER_RECIPES[name])
    shipped = load_recipe(ROOT / "recipes" / name)
    data = _large_images(tmp_path / "images", shipped.data.resolution)
    if shipped.train.method == "textual_inversion":  # its captions name the new word, as the recipe asks of the user's
        for caption in data.glob("*.txt"):
            caption.write_text(f"a photo of {shipped.embedding.token}, {caption.read_text()}")
    recipe = load_recipe(ROOT / "recipes" / name, [
        f"model.path={model}", f"data.path={data}",
        # Where a test may write, and how long it may take:
        "train.max_steps=1", "train.lr_warmup_steps=0", "train.batch_size=1", "train.gradient_accumulation_steps=1",
        f"output.dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}",
        "train.mixed_precision=no",
    ])
    result = train(recipe)
    assert result.steps == 1 and result.output == tmp_path / "out" / f"{shipped.output.name}.safetensors"
    if shipped.train.method == "lora":
        tensors, metadata = read_lora(result.output)
        version = {"lora_vpred.yaml": "sd_v2", "lora_sdxl.yaml": "sdxl_base_v1-0"}.get(name, "sd_v1")
        assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == str(version == "sd_v2")
        assert metadata["modelspec.prediction_type"] == {"epsilon": "epsilon", "v_prediction": "v"}[shipped.model.prediction_type]
        assert any(k.endswith(("lora_up.weight", "lokr_w1")) and tensors[k].abs().max() > 0 for k in tensors)  # trained (both start at 0)
    elif shipped.train.method == "textual_inversion":
        from sdtune.textual_inversion import read_embedding

        tensors, metadata = read_embedding(result.output)
        assert tensors["emb_params"].shape == (shipped.embedding.vectors, 32)
        assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    else:
        checkpoint = read_checkpoint(result.output)
        assert checkpoint.version == "sd_v1" and checkpoint.prediction_type == "epsilon"


@pytest.mark.parametrize("name", sorted(USER_RECIPES))
def test_shipped_recipe_without_the_users_files_says_what_to_set(name, tmp_path, capsys, monkeypatch):
    from sdtune.cli import main as cli_main

    monkeypatch.chdir(tmp_path)  # where neither models/ nor my_images/ exist
    code = cli_main(["train", "--recipe", str(ROOT / "recipes" / name),
                     "--set", f"output.dir={tmp_path / 'out'}", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "data.path my_images does not exist" in err, err


def test_yaml_mistakes_name_the_file_line_and_column(tmp_path, capsys):
    from sdtune.errors import run_command

    path = tmp_path / "r.yaml"
    for text, expected in [
        ("train:\n  max_steps: 3\n\tbatch_size: 2\n", r"line 3, column 1: found character '\\t' .*spaces, not tabs"),
        ("train: {learning_rate: [1e-4\n", r"line 2, column 1: expected ',' or '\]'.* \(while parsing a flow sequence at line 1, column 24\)"),
        ("preview:\n  prompts: [@cat]\n", r"line 2, column 13: found character '@'"),
        ("train:\n  seed: 1\x00\n", r"line 2, column 10: character '\\x00' is not allowed"),
        ("a: 1\n---\nb: 2\n", r"line 2, column 1: but found another document"),
        ("[" * 5000, "it is nested too deeply"),
    ]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(RecipeError, match=rf"^recipe {path} is not valid YAML: {expected}") as info:
            load_recipe(path)
        assert "\n" not in str(info.value)
    # The CLI's answer: one paragraph, exit status 2, no traceback.
    assert run_command(lambda: load_recipe(path)) == 2
    assert capsys.readouterr().err.startswith(f"sdtune: error: recipe {path} is not valid YAML")


def test_a_recipe_that_is_not_utf8_text_a_file_or_a_mapping_says_so(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("train:\n  max_steps: 3 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"not UTF-8 text: byte 27 \(line 2, column 21\) is 0xe9; save the file as UTF-8"):
        load_recipe(path)
    path.write_bytes("train:\n  max_steps: 3\n".encode("utf-16"))
    with pytest.raises(RecipeError, match="not UTF-8 text"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="cannot be read: File name too long"):
        load_recipe(tmp_path / ("x" * 5000))
    for text in ("", "# only a comment\n", "---\n"):
        path.write_text(text)
        with pytest.raises(RecipeError, match="is empty; a recipe is a mapping of sections"):
            load_recipe(path)
    path.write_text("- train\n- data\n")
    with pytest.raises(RecipeError, match="must be a mapping of sections, got list"):
        load_recipe(path)
    path.write_bytes(b"\xef\xbb\xbftrain:\n  max_steps: 3\n")  # a BOM is fine
    assert load_recipe(path).train.max_steps == 3


def test_set_value_that_is_not_yaml_names_the_column():
    with pytest.raises(RecipeError, match=r"--set 'preview.prompts=\[a cat': the value is not valid YAML \(column 7: expected ',' or '\]'") as info:
        load_recipe(None, ["preview.prompts=[a cat"])
    assert "put quotes around" in str(info.value)
    with pytest.raises(RecipeError, match=r"column 1: found character '@'"):
        load_recipe(None, ["preview.prompts=@cat"])
    with pytest.raises(RecipeError, match="not a dotted key"):
        load_recipe(None, ["train..max_steps=3"])
    assert load_recipe(None, ["preview.prompts=['@cat: on a mat']"]).preview.prompts == ["@cat: on a mat"]


@pytest.mark.parametrize("assignment,message", [
    ("train.learning_rate=.inf", "train.learning_rate: Input should be a finite number"),
    ("train.learning_rate=.nan", "train.learning_rate: Input should be a finite number"),
    ("train.learning_rate=inf", "train.learning_rate: Input should be a finite number"),
    ("train.learning_rate=1e4", "train.learning_rate: Input should be less than or equal to 10"),
    ("train.text_encoder_learning_rate=11.0", "train.text_encoder_learning_rate: Input should be less than or equal to 10"),
    ("train.text_encoder_learning_rate=-1e-4", "train.text_encoder_learning_rate: Input should be greater than 0"),
    ("data.max_aspect_ratio=.inf", "data.max_aspect_ratio: Input should be a finite number"),
    ("train.logit_mean=-.inf", "train.logit_mean: Input should be a finite number"),
    ("lora.merge_first_weight=.nan", "lora.merge_first_weight: Input should be a finite number"),
    ("preview.cfg=1e400", "preview.cfg: Input should be a finite number"),
    ("data.resolution=1048576", "data.resolution must be a multiple of 8 from 64 to 4096"),
    ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
    ("train.seed=4294967295", "train.seed: Input should be less than or equal to 2147483647"),
    ("preview.seed=4294967296", "preview.seed: Input should be less than or equal to 4294967295"),
    ("train.min_timestep=1000", "train.min_timestep: Input should be less than or equal to 999"),
    ("preview.size=100", "preview.size must be a multiple of 8"),
    ("data.path=' '", "data.path is empty"),
    ("data.sources=[{path: ''}]", "data.sources.0.path: the path is empty"),
    ("data.sources=[{path: x, caption_extensions: [txt]}]", "caption_extensions must be file suffixes such as '.txt', got \\['txt'\\]"),
    ("train.compile=fast", "train.compile: Input should be False, True, 'inductor', 'aot_eager' or 'eager'$"),
])
def test_values_that_would_fail_at_run_time_are_refused_at_load(assignment, message):
    extra = ["data.path=null"] if assignment.startswith("data.sources") else []
    with pytest.raises(RecipeError, match=message):
        load_recipe(ROOT / "recipes/tiny_demo.yaml", [*extra, assignment])


def test_run_time_rules_are_checked_at_load():
    with pytest.raises(RecipeError, match="one_cycle needs train.max_steps of at least 4"):
        recipe_from_dict({"train": {"lr_scheduler": "one_cycle", "max_steps": 3}})
    assert recipe_from_dict({"train": {"lr_scheduler": "one_cycle", "max_steps": 4}}).train.max_steps == 4
    with pytest.raises(RecipeError, match="prodigy .* train.text_encoder_learning_rate around 1.0"):
        recipe_from_dict({"train": {"optimizer": "prodigy", "learning_rate": 1.0, "text_encoder_learning_rate": 1e-5}})
    vpred = {"prediction_type": "v", "zero_terminal_snr": True}
    with pytest.raises(RecipeError, match="preview.sampler heun has no zero-terminal-SNR schedule .*use one of .*euler"):
        recipe_from_dict({"model": vpred, "preview": {"prompts": ["a cat"], "sampler": "heun"}})
    assert recipe_from_dict({"model": vpred, "preview": {"prompts": ["a cat"], "sampler": "euler"}}).preview.sampler == "euler"
    assert recipe_from_dict({"model": vpred, "preview": {"sampler": "heun"}}).preview.prompts == []  # no previews, no sampler
