"""The field reference of docs/recipes.md, made from the section models so it cannot drift.

    python -m sdtune.recipe.reference > fields.md
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel

from sdtune.recipe.loading import _section_model
from sdtune.recipe.sections import Recipe


def reference_markdown() -> str:
    """The field reference of docs/recipes.md, made from the models themselves so it cannot drift."""
    lines: list[str] = []
    lists: list[tuple[str, type[BaseModel]]] = []
    for section, holder in Recipe.model_fields.items():
        lines += _field_table(f"`{section}`", section, holder.annotation)
        for name, field in holder.annotation.model_fields.items():
            item = _section_model(field.annotation)
            if item is not None:
                lists.append((f"{section}.{name}[]", item))
    for dotted, model in lists:
        lines += _field_table(f"`{dotted}` (each item)", dotted, model)
    return "\n".join(lines)


def _field_table(title: str, prefix: str, model: type[BaseModel]) -> list[str]:
    lines = [f"### {title}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else f"`{json.dumps(field.get_default(call_default_factory=True))}`"
        kind = _type_name(field.annotation).replace("|", "\\|")
        lines.append(f"| `{prefix}.{name}` | {kind} | {default} | {field.description} |")
    lines.append("")
    return lines


def _type_name(annotation: Any) -> str:
    args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is Literal:
        return " | ".join(f"`{json.dumps(a) if isinstance(a, bool) else a}`" for a in args)  # YAML's false / true
    if args:  # unions and lists
        inner = [_type_name(a) for a in args]
        return f"list[{inner[0]}]" if getattr(annotation, "__origin__", None) is list else " | ".join(inner)
    return "null" if annotation is type(None) else annotation.__name__


if __name__ == "__main__":
    print(reference_markdown())
