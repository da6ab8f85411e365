"""Reading a recipe: the YAML file, ``--set`` overrides, and errors that name the bad key.

Unknown keys are errors that name the key and the closest valid one. Overrides
use dotted keys (``--set train.learning_rate=5e-5``); their values are parsed as
YAML. Every problem, a file that is not UTF-8 or not YAML included, is a
``RecipeError`` that says where (line and column, 1-based) and what.
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
    if not all(keys):
        raise RecipeError(f"--set {assignment!r}: {dotted.strip()!r} is not a dotted key such as train.learning_rate")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {dotted}: {key!r} is a value, not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, RecursionError) as exc:
        where = _yaml_problem(exc, text, multiline="\n" in text.strip())
        raise RecipeError(
            f"--set {assignment!r}: the value is not valid YAML ({where}); put quotes around a value "
            f"with YAML's special characters, e.g. --set '{dotted}=\"...\"'"
        ) from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = _read_recipe_file(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return recipe_from_dict(raw, source=str(path) if path else "defaults")


def _read_recipe_file(path: Path) -> dict[str, Any]:
    """The mapping in a recipe file; a file that is missing, unreadable, not UTF-8, not YAML,
    empty or not a mapping is a RecipeError that says where and what."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {path} is a folder; give the path of a recipe's .yaml file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise RecipeError(f"recipe {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError(
            f"recipe {path} is not UTF-8 text: byte {exc.start} (line {line}, column {column}) is "
            f"0x{data[exc.start]:02x}; save the file as UTF-8"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {_yaml_problem(exc, text)}") from None
    if raw is None:
        raise RecipeError(
            f"recipe {path} is empty; a recipe is a mapping of sections (model:, data:, train:, ...) "
            "with the settings that differ from the defaults"
        )
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _yaml_problem(exc: BaseException, text: str, multiline: bool = True) -> str:
    """Where ``yaml.safe_load(text)`` failed (1-based line and column) and why, on one line."""
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "a syntax error"
        context = exc.context_mark
        if exc.problem and exc.context and context is not None and (context.line, context.column) != (mark.line, mark.column):
            problem += f" ({exc.context} at {_position(context.line, context.column, multiline)})"
        if "'\\t'" in problem:
            problem += "; YAML indents with spaces, not tabs"
        where = _position(mark.line, mark.column, multiline) if mark is not None else ""
        return f"{where}: {problem}" if where else problem
    if isinstance(exc, yaml.reader.ReaderError):
        # A character YAML does not allow (control characters, NUL); its position counts characters.
        line = text.count("\n", 0, exc.position)
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1)
        character = exc.character if isinstance(exc.character, str) else chr(exc.character)
        return f"{_position(line, column, multiline)}: character {character!r} is not allowed in YAML"
    return " ".join(str(exc).split())


def _position(line: int, column: int, multiline: bool) -> str:
    return f"line {line + 1}, column {column + 1}" if multiline else f"column {column + 1}"


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
