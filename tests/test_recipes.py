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
            assert getattr(getattr(recipe, section), key) == value or key == "prediction_type"


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

    assert reference_markdown() in (ROOT / "docs/recipes.md").read_text(encoding="utf-8"), "run: python -m sdtune.recipe"


def test_option_combinations_that_make_no_sense_are_rejected():
    with pytest.raises(RecipeError, match="two loss weightings; choose one"):
        recipe_from_dict({"train": {"min_snr_gamma": 5.0, "debiased_estimation": True}})
    with pytest.raises(RecipeError, match="min_timestep .* must be below train.max_timestep"):
        recipe_from_dict({"train": {"min_timestep": 500, "max_timestep": 400}})
    with pytest.raises(RecipeError, match="prodigy .* around 1.0"):
        recipe_from_dict({"train": {"optimizer": "prodigy", "learning_rate": 1e-4}})
    with pytest.raises(RecipeError, match="train.loss_type"):
        recipe_from_dict({"train": {"loss_type": "l3"}})
