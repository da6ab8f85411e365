"""Textual inversion: new token vectors trained with everything else frozen, and the
embedding file the UIs read.

The new word gets ``embedding.vectors`` tokens (``<zwx>``, ``<zwx>_1``, ... as diffusers
names them, so its pipelines spell a prompt's ``<zwx>`` out the same way) appended to
the tokenizer. Each text encoder's token embedding becomes :class:`NewTokenRows`: the
base table, frozen, plus a small trainable table of the new rows, so the optimizer,
the EMA and the checkpoints hold only those rows and no other row can change.

The file (``<output.name>.safetensors``), as the UIs read it:
- SD 1/2: one tensor, ``emb_params`` (vectors x hidden). A1111's ``create_embedding_from_data``
  takes a file of exactly one tensor (any name) and registers it when its width is the
  model's; ComfyUI's ``load_embed`` takes the ``clip_l``/``clip_h`` key if there is one,
  else the first tensor; diffusers' ``load_textual_inversion`` takes a one-key dict.
- SDXL: ``clip_l`` (vectors x 768) and ``clip_g`` (vectors x 1280): A1111 wants both keys,
  ComfyUI's CLIP-L and bigG tokenizers each take theirs.
A1111 and ComfyUI read only the tensors; the safetensors metadata (modelspec, steps,
base model) is for sdtune, diffusers users and model browsers.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from sdtune import atomic
from sdtune.errors import DataError, ModelFileError, RecipeError
from sdtune.export.metadata import MODELSPEC_ARCHITECTURE, MODELSPEC_PREDICTION, SDXL
from sdtune.weight_files import is_pickle, read_weights


class NewTokenRows(torch.nn.Module):
    """A token embedding with rows appended: ids below the base vocabulary read the frozen
    ``base`` table, the others read ``rows``, the only trainable weights."""

    def __init__(self, base: torch.nn.Embedding, rows: torch.Tensor, tokens: list[str]):
        super().__init__()
        self.base, self.vocab, self.tokens = base.requires_grad_(False), base.num_embeddings, list(tokens)
        self.rows = torch.nn.Parameter(rows.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # what transformers asks a token embedding for (dtype, device)
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.base(input_ids.clamp(max=self.vocab - 1))
        # Always read through ``rows``: a batch without the token still gives it a (zero)
        # gradient, so every process of a DDP run reduces the same parameters.
        new = F.embedding((input_ids - self.vocab).clamp(0, len(self.rows) - 1), self.rows).to(base.dtype)
        return torch.where((input_ids >= self.vocab).unsqueeze(-1), new, base)


def vector_tokens(token: str, vectors: int) -> list[str]:
    """The tokenizer entries of a word of ``vectors`` vectors, named as diffusers names them."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def spell_out(text: str, token: str, vectors: int) -> str:
    """``text`` with each ``token`` written as its ``vectors`` tokens (what diffusers'
    ``maybe_convert_prompt`` does to a prompt)."""
    # The tokenizer lowercases, so ZWX names the word as zwx does.
    return text if vectors == 1 else re.sub(re.escape(token), " ".join(vector_tokens(token, vectors)), text, flags=re.IGNORECASE)


def _encoders(parts) -> list[tuple[str, object, object]]:
    """(file key, tokenizer, text encoder) of each encoder: SD 1/2's one, SDXL's CLIP-L and bigG."""
    if parts.base_model_version == SDXL:
        return [("clip_l", parts.tokenizer, parts.text_encoder), ("clip_g", parts.tokenizer_2, parts.text_encoder_2)]
    return [("emb_params", parts.tokenizer, parts.text_encoder)]


def check_token(tokenizer, token: str, init_word: str, vectors: int) -> list[int]:
    """The init word's token ids, after the checks that the new word is new and the init word fits."""
    pieces = tokenizer.tokenize(token)
    if len(pieces) == 1 and (pieces[0] in tokenizer.get_vocab() or token in tokenizer.get_added_vocab()):
        raise RecipeError(
            f"embedding.token {token!r} is already a word of the tokenizer's vocabulary ({pieces[0]!r}): captions that "
            "use it in its usual sense would train the new vectors too, and the UIs would not tell the two apart. "
            "Choose a made-up word, e.g. '<zwx>' or 'zwx'")
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise RecipeError(f"embedding.init_word {init_word!r} has no tokens; give a word, e.g. the class word 'dog'")
    if len(ids) > vectors:
        raise RecipeError(
            f"embedding.init_word {init_word!r} is {len(ids)} tokens ({', '.join(tokenizer.convert_ids_to_tokens(ids))}) "
            f"and embedding.vectors is {vectors}: each vector starts from one token. Raise embedding.vectors to {len(ids)} "
            "or choose an init word of fewer tokens")
    return ids


def add_embedding(parts, plan, token: str, init_word: str, vectors: int):
    """Give every text encoder of ``parts`` the new word's rows, started from ``init_word``'s
    embedding (vector i from init token i*K//vectors, as A1111 does), and add the word to
    every tokenizer. Returns ``plan`` with the word spelt out as its tokens in every caption."""
    captions = [item.caption for item in plan.train]
    if not any(token.lower() in caption.lower() for caption in captions):
        raise DataError(
            f"embedding.token {token!r} is in none of the {len(captions)} training captions, so the new vectors would get "
            f"no gradient. Name it in the captions (e.g. 'a photo of {token}'), or put it in front of every caption of a "
            f"source with data.sources[].prefix: {token}")
    tokens = vector_tokens(token, vectors)
    for _, tokenizer, encoder in _encoders(parts):
        ids = check_token(tokenizer, token, init_word, vectors)
        base = encoder.get_input_embeddings()
        with torch.no_grad():
            rows = base.weight[[ids[i * len(ids) // vectors] for i in range(vectors)]].float()
        tokenizer.add_tokens(tokens)
        if tokenizer.convert_tokens_to_ids(tokens) != list(range(base.num_embeddings, base.num_embeddings + vectors)):
            raise RecipeError(f"the tokenizer holds {len(tokenizer)} entries but the text encoder {base.num_embeddings} "
                              "rows: this base model's tokenizer does not match its text encoder")
        encoder.set_input_embeddings(NewTokenRows(base, rows, tokens))
        pool_at_end_token(encoder, tokenizer)
    return dataclasses.replace(plan, train=_spelt(plan.train, token, vectors), validation=_spelt(plan.validation, token, vectors))


def pool_at_end_token(encoder, tokenizer) -> None:
    """Pool at the end token, as A1111 and ComfyUI do, not at the highest id (transformers'
    reading of configs that say eos_token_id 2, as SD's and SDXL's own do), which a new word's
    ids would now be; SDXL's bigG pools for the UNet."""
    encoder.config.eos_token_id = tokenizer.eos_token_id
    for module in encoder.modules():  # CLIPTextModel itself in transformers 5, its text_model in 4
        if "eos_token_id" in vars(module):
            module.eos_token_id = tokenizer.eos_token_id


def _spelt(items: list, token: str, vectors: int) -> list:
    def sample(s):
        return dataclasses.replace(s, caption=spell_out(s.caption, token, vectors), prefix=spell_out(s.prefix, token, vectors))

    return [dataclasses.replace(item, sample=sample(item.sample)) for item in items]


def new_rows(text_encoder) -> list[NewTokenRows]:
    """The :class:`NewTokenRows` of a text encoder (SDXL's two together: CLIP-L's, then bigG's)."""
    return [m for m in text_encoder.modules() if isinstance(m, NewTokenRows)]


def trainable_rows(unet, text_encoder, device: torch.device, weight_dtype: torch.dtype, learning_rate: float,
                   gradient_checkpointing: bool) -> list[dict]:
    """Everything frozen and stored in ``weight_dtype`` on ``device`` but the new rows (fp32,
    so small updates are not rounded away). Returns the optimizer's param group."""
    unet.requires_grad_(False).to(device, dtype=weight_dtype)
    text_encoder.requires_grad_(False).to(device, dtype=weight_dtype)
    rows = [module.rows for module in new_rows(text_encoder)]
    for row in rows:
        row.data = row.data.float()
        row.requires_grad_(True)
    if gradient_checkpointing:  # the rows' gradient passes back through both
        unet.enable_gradient_checkpointing()
        text_encoder.activation_checkpointing_enable()
    return [{"params": rows, "lr": learning_rate}]


def embedding_tensors(text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The file's tensors: ``emb_params`` (SD 1/2), or ``clip_l`` and ``clip_g`` (SDXL)."""
    if text_encoder_2 is None:
        return {"emb_params": new_rows(text_encoder)[0].rows.detach().float().cpu().contiguous()}
    return {key: new_rows(encoder)[0].rows.detach().float().cpu().contiguous()
            for key, encoder in (("clip_l", text_encoder), ("clip_g", text_encoder_2))}


def save_embedding(path: Path, text_encoder, text_encoder_2, parts, spec, steps: int, num_images: int) -> Path:
    """Write the embedding file atomically, in fp32 (a few KB), with metadata saying how it was made."""
    tensors = embedding_tensors(text_encoder, text_encoder_2)
    tokens = new_rows(text_encoder)[0].tokens
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCHITECTURE[(parts.base_model_version, spec.prediction_type)]}/textual-inversion",
        "modelspec.implementation": "diffusers",
        "modelspec.title": spec.title,
        "modelspec.prediction_type": MODELSPEC_PREDICTION[spec.prediction_type],
        "modelspec.resolution": f"{spec.resolution}x{spec.resolution}",
        # What A1111 keeps with an embedding it trained (its .pt keys), as strings.
        "name": spec.title, "step": str(steps), "sd_checkpoint": parts.sha256[:10], "sd_checkpoint_name": parts.name,
        "ss_base_model_version": parts.base_model_version, "ss_num_train_images": str(num_images),
        "sdtune.token": tokens[0], "sdtune.vectors": str(len(tokens)), "sdtune.base_model_sha256": parts.sha256,
        "sdtune.recipe": spec.recipe_json,
    }
    return atomic.save_safetensors(tensors, path, metadata)


def read_embedding(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An embedding file's tensors and metadata; with ``allow_pickle`` also A1111's ``.pt``
    (its ``string_to_param`` vectors, read with ``torch.load(weights_only=True)``)."""
    path = Path(path)
    if path.is_file() and is_pickle(path) and allow_pickle:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            (vectors,) = data["string_to_param"].values()
        except Exception as exc:  # any reason the file is not an A1111 embedding of tensors
            raise ModelFileError(f"{path} is not an A1111 embedding of tensors ({type(exc).__name__}: {str(exc)[:200]}); "
                                 "convert it to .safetensors with the tool that made it") from None
        return {"emb_params": vectors}, {}
    return read_weights(path, allow_pickle)


def load_into_pipeline(pipe, path: str | Path, token: str | None = None, allow_pickle: bool = False) -> str:
    """Add an embedding file to a diffusers pipeline under ``token`` (default: the file's
    stem, the word A1111 users type), through diffusers' ``load_textual_inversion``; SDXL
    files into both encoders. Returns the token."""
    path = Path(path)
    token = token or path.stem
    tensors, _ = read_embedding(path, allow_pickle)
    if getattr(pipe, "text_encoder_2", None) is not None:
        if not {"clip_l", "clip_g"} <= tensors.keys():
            raise RecipeError(f"--embedding {path}: an SDXL model needs an SDXL embedding (clip_l and clip_g), "
                              f"this file has {', '.join(tensors)}")
        pipe.load_textual_inversion(tensors["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(tensors["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        pool_at_end_token(pipe.text_encoder_2, pipe.tokenizer_2)
    else:
        if len(tensors) != 1:
            raise RecipeError(f"--embedding {path}: an SD 1/2 embedding holds one tensor; this file has {', '.join(tensors)}")
        pipe.load_textual_inversion(next(iter(tensors.values())), token=token)
    return token


WIDTHS = {768: "SD 1.x (CLIP ViT-L, 768)", 1024: "SD 2.x (OpenCLIP ViT-H, 1024)"}


def is_embedding(tensors: dict[str, torch.Tensor]) -> bool:
    """An embedding file as A1111 reads one: SDXL's clip_l and clip_g, or a single 1-D/2-D tensor."""
    if set(tensors) == {"clip_l", "clip_g"}:
        return True
    return len(tensors) == 1 and next(iter(tensors.values())).ndim in (1, 2) and "." not in next(iter(tensors))


def embedding_lines(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[str]:
    """What ``sdtune inspect`` says of an embedding file."""
    path = Path(path)
    if "clip_l" in tensors and "clip_g" in tensors:
        vectors, widths = tensors["clip_g"].shape[0], f"clip_l {tensors['clip_l'].shape[-1]}, clip_g {tensors['clip_g'].shape[-1]}"
        model = "SDXL (CLIP-L 768 + bigG 1280)" if (tensors["clip_l"].shape[-1], tensors["clip_g"].shape[-1]) == (768, 1280) else None
    else:
        (key, value), = tensors.items()
        vectors, widths = (value.shape[0] if value.ndim == 2 else 1), f"{key} {value.shape[-1]}"
        model = WIDTHS.get(value.shape[-1])
    lines = [f"{path.name}: textual-inversion embedding, {vectors} vector(s) ({widths} wide)",
             f"for: {model or 'no released SD model has this width (a tiny test model?); A1111 and ComfyUI skip it on others'}",
             f"prompt word: A1111 `{path.stem}` (the file name), ComfyUI `embedding:{path.stem}`, "
             f"diffusers load_textual_inversion(..., token=...)"]
    if "sdtune.token" in metadata:
        lines.append(f"trained by sdtune: token {metadata['sdtune.token']!r}, {metadata.get('step', '?')} steps, "
                     f"base {metadata.get('sd_checkpoint_name', '?')} [{metadata.get('sd_checkpoint', '?')}]")
    return lines
