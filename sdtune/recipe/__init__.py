"""Recipes: one YAML file says everything about a run, validated before any work.

A recipe has ten sections (``model``, ``data``, ``lora``, ``train``, ``ema``,
``checkpoint``, ``validation``, ``preview``, ``output``, ``export``), defined in
``sections``; ``loading`` reads files and ``--set`` overrides; ``reference``
writes the field table of docs/recipes.md.
"""

from sdtune.errors import RecipeError
from sdtune.recipe.loading import apply_override, load_recipe, recipe_from_dict
from sdtune.recipe.reference import reference_markdown
from sdtune.recipe.sections import (
    PREDICTION_ALIASES,
    TEXT_ENCODER_TARGETS,
    DataSection,
    Recipe,
)

__all__ = [
    "PREDICTION_ALIASES", "TEXT_ENCODER_TARGETS", "DataSection", "Recipe", "RecipeError",
    "apply_override", "load_recipe", "recipe_from_dict", "reference_markdown",
]
