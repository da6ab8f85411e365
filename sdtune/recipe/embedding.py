"""The recipe's embedding section: the new token a textual inversion trains, and the rules
that tie it to the rest of the recipe."""

from __future__ import annotations

from pydantic import Field, field_validator

from sdtune.recipe.base import _Section

MAX_VECTORS = 75  # a CLIP prompt holds 75 tokens between its start and end


class EmbeddingSection(_Section):
    token: str | None = Field(
        None,
        description="With train.method: textual_inversion, the new word the captions name what is learnt by, e.g. `<zwx>`; "
        "one word that is not already a word of CLIP's vocabulary. null: output.name, the file stem A1111 users type.",
    )
    init_word: str = Field(
        "*",
        description="Word(s) the new vectors start from, e.g. the class word `dog`; several tokens are spread over "
        "the vectors as A1111 does (at most embedding.vectors of them).",
    )
    vectors: int = Field(
        1, ge=1, le=MAX_VECTORS,
        description="Vectors per token (A1111's 'number of vectors per token'): more hold more, and each takes a place "
        "of the prompt's 75.",
    )

    @field_validator("token")
    @classmethod
    def _one_word(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ValueError(f"embedding.token must be one word without spaces, e.g. '<zwx>', got {value!r}")
        return value

    @field_validator("init_word")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("embedding.init_word is empty; give a word the new vectors start from, e.g. the class word 'dog'")
        return value


def _changed(section) -> list[str]:
    """Fields of ``section`` that differ from their defaults (a resolved recipe repeats the defaults)."""
    return [name for name, field in type(section).model_fields.items()
            if getattr(section, name) != field.get_default(call_default_factory=True)]


def check_embedding(recipe) -> None:
    """Cross-section rules of a textual inversion (``recipe``: the whole Recipe, at load)."""
    method, embedding = recipe.train.method, recipe.embedding
    if method != "textual_inversion":
        if _changed(embedding):
            raise ValueError(f"embedding.{_changed(embedding)[0]} is a textual-inversion setting; "
                             "set train.method: textual_inversion, or remove the embedding section")
        return
    if _changed(recipe.lora):
        names = ", ".join(f"lora.{name}" for name in _changed(recipe.lora))
        raise ValueError(f"{names}: train.method: textual_inversion trains only the new token's vectors, with the UNet "
                         "and text encoder frozen, so LoRA settings have no effect; remove them (or use train.method: lora)")
    for name in ("text_encoder_learning_rate", "text_encoder_steps"):
        if getattr(recipe.train, name) is not None:
            raise ValueError(f"train.{name} is for a trained text encoder; train.method: textual_inversion trains only the "
                             "new token's vectors, at train.learning_rate for train.max_steps: remove it")
    if recipe.train.full_text_encoder:
        raise ValueError("train.full_text_encoder trains every text-encoder weight; train.method: textual_inversion "
                         "trains only the new token's vectors: remove it")
    if embedding.token is None:  # the name A1111 users type: the file's stem
        if any(c.isspace() for c in recipe.output.name):
            raise ValueError(f"embedding.token is null, so the new word would be output.name {recipe.output.name!r}, "
                             "which has spaces; set embedding.token to one word, e.g. '<zwx>'")
        embedding.token = recipe.output.name
