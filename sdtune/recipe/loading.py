"""Reading a recipe: the YAML file, ``--set`` overrides, and errors that name the bad key.

Unknown keys are errors that name the key and the closest valid one. Overrides
use dotted keys (``--set train.learning_rate=5e-5``); their values are parsed as
YAML scalars.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sdtune.errors import RecipeError
from sdtune.recipe.sections import Recipe


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override to a raw (unvalidated) recipe dict."""
    if "=" not in assignment:
        raise RecipeError(f"--set expects key=value (e.g. train.learning_rate=5e-5), got {assignment!r}")
    dotted, text = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(text) if text.strip() else ""


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    return recipe_from_dict(raw, source=str(path) if path else "defaults")


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        raise RecipeError(f"{source} is not a valid recipe:\n  " + "\n  ".join(problems)) from None


def _describe(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"]]
    dotted = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(loc[:-1] + close)}'?" if close else f"; valid keys here: {', '.join(valid)}"
        return f"unknown key '{dotted}'{hint}"
    message = err["msg"].removeprefix("Value error, ")
    return f"{dotted}: {message}" if dotted else message


def _valid_keys(section_path: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in section_path:
        if part.isdigit():  # an item of a list of sections (data.sources.0)
            continue
        field = model.model_fields.get(part)
        annotation = _section_model(field.annotation) if field is not None else None
        if annotation is None:
            return []
        model = annotation
    return list(model.model_fields)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field that holds one, or a list of them."""
    if getattr(annotation, "__origin__", None) is list:
        annotation = annotation.__args__[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
