"""Property tests: whatever a recipe or a dataset file holds, sdtune answers with a
valid result or a user error (RecipeError, DataError) that says what to fix, never
a traceback from yaml, json, csv, pathlib or pydantic."""

from __future__ import annotations

import codecs
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel

from sdtune.data.plan import BucketSpec, plan_dataset
from sdtune.data.sources import Source, find_samples
from sdtune.errors import DataError, UserError
from sdtune.recipe import Recipe, RecipeError, load_recipe
from sdtune.tiny import clip_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Recipes

SECTIONS = {name: list(field.annotation.model_fields) for name, field in Recipe.model_fields.items()}
FIELDS = [f"{name}.{key}" for name, keys in SECTIONS.items() for key in keys]
FLOAT_FIELDS = [  # where inf, nan and 1e4 get in
    f"{name}.{key}" for name, field in Recipe.model_fields.items()
    for key, inner in field.annotation.model_fields.items() if "float" in str(inner.annotation)
]


@st.composite
def _misspelled(draw, names):
    """A real name, or one with a letter dropped, doubled or swapped (what people type)."""
    name = draw(st.sampled_from(names))
    if draw(st.integers(0, 3)) or len(name) < 2:
        return name
    i = draw(st.integers(0, len(name) - 2))
    return draw(st.sampled_from([
        name[:i] + name[i + 1:], name[:i] + name[i] + name[i:], name[:i] + name[i + 1] + name[i] + name[i + 2:],
        name.upper(), name + "s", name.replace("_", "-"),
    ]))


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=1100),
    st.integers(),
    st.floats(),  # nan, inf, 1e308, subnormals
    st.sampled_from([0.0, -1e-4, 1e-4, 0.5, 1.0, 10.0, 11.0, 1e4, 1e308, math.inf, -math.inf, math.nan]),
    st.text(max_size=12),
    st.sampled_from([
        "epsilon", "v", "v_prediction", "lora", "full", "custom", "prodigy", "adamw", "one_cycle", "cosine", "fp16", "bf16",
        "no", "inf", "-inf", "nan", ".inf", "1e4", "1e-4", "NaN", "datasets/sample", "", "  ", "to_q", "q_proj",
    ]),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10
)


@st.composite
def _section(draw, name):
    fields = SECTIONS.get(name) or SECTIONS["train"]
    return draw(st.dictionaries(_misspelled(fields), VALUES, max_size=5))


@st.composite
def recipe_documents(draw):
    """A mapping of (mostly real, sometimes misspelled) sections to fields with values of any type."""
    document = {}
    for name in draw(st.lists(_misspelled(list(SECTIONS)), max_size=4, unique=True)):
        document[name] = draw(_section(name)) if draw(st.integers(0, 5)) else draw(VALUES)
    return document


@st.composite
def recipe_texts(draw):
    """What a recipe file may hold: YAML of a random recipe, that YAML with a few characters
    added or removed (syntax errors), any text, or any bytes."""
    kind = draw(st.integers(0, 5))
    if kind <= 2:
        text = yaml.safe_dump(draw(recipe_documents()), sort_keys=False, allow_unicode=draw(st.booleans()))
        if kind == 2 and text:
            at = draw(st.integers(0, len(text)))
            junk = draw(st.text(alphabet=":-[]{}\t\"'&*!|>%@`#,? \n\x00\x85\ufeff", max_size=4))
            text = text[:at] + junk + text[at + draw(st.integers(0, 3)):]
        return text.encode("utf-8")
    if kind == 3:
        return draw(st.text()).encode("utf-8")
    if kind == 4:
        return draw(st.text(max_size=40)).encode(draw(st.sampled_from(["utf-16", "latin-1", "utf-8-sig"])), "replace")
    return draw(st.binary())


def _dotted(draw):
    section = draw(_misspelled(list(SECTIONS)))
    keys = [section, draw(_misspelled(SECTIONS.get(section) or SECTIONS["train"]))]
    return ".".join(keys[: draw(st.integers(1, 3))] + draw(st.lists(st.text(max_size=4), max_size=1)))


@st.composite
def overrides(draw):
    """``--set`` assignments: dotted keys of real and misspelled names, values as YAML or any text."""
    found = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            value = yaml.safe_dump(draw(VALUES), default_flow_style=True).removesuffix("\n...\n").strip()
        else:
            value = draw(st.text(max_size=20))
        found.append(f"{_dotted(draw)}={value}" if draw(st.integers(0, 9)) else draw(st.text(max_size=20)))
    return found


@st.composite
def field_overrides(draw):
    """Valid-looking ``--set`` of real fields to random values, so that most recipes load
    and the check of what loaded has something to check."""
    found = []
    for _ in range(draw(st.integers(1, 3))):
        value = yaml.safe_dump(draw(SCALARS), default_flow_style=True).removesuffix("\n...\n").strip()
        found.append(f"{draw(st.sampled_from(FLOAT_FIELDS) | st.sampled_from(FIELDS))}={value}")
    return found


def _floats(node):
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _floats(getattr(node, name))
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _floats(item)
    elif isinstance(node, float):
        yield node


def _load(path=None, assignments=()):
    """The property: a recipe loads with sane values, or the error is a RecipeError."""
    try:
        recipe = load_recipe(path, assignments)
    except RecipeError as exc:
        assert str(exc).strip()
        return None
    assert isinstance(recipe, Recipe)
    for rate in (recipe.train.learning_rate, recipe.train.text_encoder_learning_rate):
        assert rate is None or (math.isfinite(rate) and 0 < rate <= 10), rate
    assert all(math.isfinite(value) for value in _floats(recipe)), recipe
    return recipe


@FUZZ
@given(content=recipe_texts())
@example(content=b"train:\n  learning_rate: .inf\n")
@example(content=b"train: {learning_rate: [1\n")
@example(content=b"\xff\xfe")
def test_any_recipe_file_loads_or_raises_recipe_error(tmp_path, content):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    _load(path)


@FUZZ
@given(assignments=overrides())
def test_any_set_override_loads_or_raises_recipe_error(assignments):
    _load(None, assignments)
    _load(ROOT / "recipes" / "tiny_demo.yaml", assignments)


@FUZZ
@given(assignments=field_overrides())
@example(assignments=["train.learning_rate=.nan"])
@example(assignments=["train.learning_rate=1e4"])
def test_fields_set_to_any_value_load_sane_or_raise_recipe_error(assignments):
    _load(ROOT / "recipes" / "tiny_demo.yaml", assignments)


# Dataset files

IMAGES = ("a.png", "b.png", "sub/c.png")


def _png_bytes(size, color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


PNGS = [_png_bytes((64, 64), (200, 30, 30)), _png_bytes((96, 64), (30, 200, 30)), _png_bytes((64, 80), (30, 30, 200))]

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30),
    st.sampled_from(["\ud800", "a\x00b", "\ufeffcap", "x" * 5000, "caption, with, tags", ""]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=6
)
FILE_NAMES = st.one_of(
    st.sampled_from([*IMAGES, "missing.png", "", ".", "..", "sub", "../a.png", "/etc/hostname", "a\x00.png", "\ud800.png", "x" * 5000]),
    JSON_VALUES,
)


@st.composite
def _encoded(draw, text):
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    return text.encode(encoding, "surrogatepass" if encoding.startswith("utf-8") else "replace")


@st.composite
def caption_bytes(draw):
    """A caption file: text in some encoding, random bytes, NULs, a BOM, a huge line."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        return codecs.BOM_UTF8 + draw(st.text(max_size=30)).encode("utf-8", "surrogatepass")
    if kind == 2:
        return (draw(st.text(max_size=10)) * draw(st.sampled_from([1, 1000, 20000]))).encode("utf-8", "surrogatepass")
    return draw(_encoded(draw(st.text(max_size=40))))


@st.composite
def jsonl_bytes(draw):
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.integers(0, 9))
        if kind <= 5:
            row = {"file_name": draw(FILE_NAMES), "text": draw(JSON_VALUES)}
            for key in draw(st.lists(st.sampled_from(["file_name", "text"]), max_size=1)):
                del row[key]
            row |= draw(st.dictionaries(st.text(max_size=6), JSON_SCALARS, max_size=2))
            lines.append(json.dumps(row, ensure_ascii=draw(st.booleans())))
        elif kind == 6:
            lines.append(json.dumps(draw(JSON_VALUES)))
        elif kind == 7:
            lines.append(draw(st.sampled_from(["[" * 5000, "1" * 5000, "{", "", "\ufeff{}", "NaN", "\u2028"])))
        else:
            lines.append(draw(st.text(max_size=20)))
    text = draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    return draw(_encoded(text)) if draw(st.integers(0, 3)) == 0 else text.encode("utf-8", "surrogatepass")


CSV_CELLS = st.one_of(
    st.sampled_from([*IMAGES, "missing.png", "", "a, red box", '"quoted"', "line\nbreak", "x" * 200_000, "a\x00b"]), st.text(max_size=12)
)


@st.composite
def csv_bytes(draw):
    header = draw(st.lists(st.sampled_from(["file_name", "text", "prompt", "", "file_name"]) | st.text(max_size=5), max_size=4))
    lines = [",".join(header)] if draw(st.integers(0, 5)) else []
    for _ in range(draw(st.integers(0, 5))):
        cells = draw(st.lists(CSV_CELLS, max_size=5))
        lines.append(",".join(f'"{c}"' if draw(st.booleans()) else c for c in cells))
    text = "\n".join(lines)
    return draw(st.binary(max_size=64)) if draw(st.integers(0, 5)) == 0 else draw(_encoded(text))


@st.composite
def dataset_folders(draw):
    """{relative path: bytes}: three real images, with caption files or a metadata table."""
    files = dict(zip(IMAGES, PNGS))
    kind = draw(st.sampled_from(["captions", "metadata.jsonl", "metadata.csv"]))
    if kind == "captions":
        for image in IMAGES:
            if draw(st.integers(0, 4)):
                files[str(Path(image).with_suffix(draw(st.sampled_from([".txt", ".caption"]))))] = draw(caption_bytes())
        if draw(st.booleans()):
            files["orphan.txt"] = draw(caption_bytes())
    else:
        files[kind] = draw(jsonl_bytes() if kind.endswith("jsonl") else csv_bytes())
    return files


_TOKENIZER = []


def _tokenizer():
    if not _TOKENIZER:
        _TOKENIZER.append(clip_tokenizer())
    return _TOKENIZER[0]


@FUZZ
@given(
    files=dataset_folders(),
    missing_caption=st.sampled_from(["fail", "empty", "filename"]),
    on_bad_image=st.sampled_from(["fail", "skip"]),
    tokenize=st.booleans(),
)
@example(files={**dict(zip(IMAGES, PNGS)), "metadata.jsonl": b'{"file_name": "a.png", "text": {"a": 1}}'},
         missing_caption="empty", on_bad_image="skip", tokenize=False)
@example(files={**dict(zip(IMAGES, PNGS)), "metadata.jsonl": b'["file_name", "text"]'},
         missing_caption="empty", on_bad_image="skip", tokenize=False)
@example(files={**dict(zip(IMAGES, PNGS)), "metadata.csv": b"file_name,text\na.png,one,extra\n"},
         missing_caption="empty", on_bad_image="skip", tokenize=False)
def test_any_dataset_files_scan_or_raise_a_user_error(files, missing_caption, on_bad_image, tokenize):
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(content)
        try:
            samples, _ = find_samples(Source(tmp), missing_caption)
        except Exception as exc:  # the sources' own errors, where a whole table is unusable
            assert isinstance(exc, UserError), repr(exc)
            assert str(exc).strip()
        else:
            assert all(isinstance(s.caption, str) and s.caption == s.caption.encode("utf-8").decode() for s in samples)
        try:
            plan = plan_dataset([Source(tmp)], BucketSpec(64, 16), missing_caption=missing_caption,
                                on_bad_image=on_bad_image, tokenizer=_tokenizer() if tokenize else None, threads=1)
        except Exception as exc:
            assert isinstance(exc, UserError), repr(exc)
        else:
            assert plan.train and all(isinstance(item.caption, str) for item in plan.train)


def _folder_with(tmp, name: str, content: bytes) -> str:
    for image, png in zip(IMAGES, PNGS):
        (Path(tmp) / image).parent.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / image).write_bytes(png)
    (Path(tmp) / name).write_bytes(content)
    return str(tmp)


BAD_TABLES = {
    "row is a list": ("metadata.jsonl", b'["a.png", "a cat"]\n', r"metadata.jsonl line 1 is a list, not an object with 'file_name' and 'text'"),
    "caption is a number": ("metadata.jsonl", b'\n{"file_name": "a.png", "text": 42}\n', r"line 2: 'text' is a number, not a caption"),
    "caption is an object": ("metadata.jsonl", b'{"file_name": "a.png", "text": {"en": "a cat"}}', r"'text' is an object, not a caption"),
    "file_name is null": ("metadata.jsonl", b'{"file_name": null, "text": "a cat"}', r"'file_name' is null, not the path of an image"),
    "lone surrogate": ("metadata.jsonl", b'{"file_name": "a.png", "text": "a \\ud800 cat"}', r"'text' holds the lone surrogate '\\ud800' at character 2"),
    "not JSON": ("metadata.jsonl", b'{"file_name": "a.png", "text": "a cat"\n', r"line 1 is not JSON: Expecting ',' delimiter \(column 39\)"),
    "nested too deeply": ("metadata.jsonl", b"[" * 100_000, r"line 1 is not a JSON object we can read: maximum recursion depth"),
    "a 5000-digit number": ("metadata.jsonl", b"1" * 5000, r"line 1 is not a JSON object we can read: Exceeds the limit"),
    "not UTF-8": ("metadata.jsonl", '{"file_name": "a.png", "text": "caf\xe9"}'.encode("latin-1"), r"is not valid UTF-8 \(byte 35\)"),
    "missing column": ("metadata.csv", b"file_name,prompt\na.png,a cat\n", r"metadata.csv line 2 has no 'text' column \(columns: file_name, prompt\)"),
    "unquoted comma": ("metadata.csv", b"file_name,text\na.png,a red box, studio\n", r"line 2 has 3 cells but the header has 2 .*put quotes around captions"),
    "huge cell": ("metadata.csv", b"file_name,text\na.png,\"" + b"x" * 200_000 + b'"\n', r"line 2 is not CSV: field larger than field limit"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_a_metadata_table_that_cannot_be_read_is_a_data_error_naming_the_line(tmp_path, case):
    name, content, message = BAD_TABLES[case]
    with pytest.raises(DataError, match=message):
        find_samples(Source(_folder_with(tmp_path, name, content)), "fail")


def test_metadata_rows_naming_no_file_are_orphans_and_odd_tables_still_read(tmp_path):
    rows = [
        {"file_name": "a.png", "text": "a cat"}, {"file_name": "b.png", "text": None},
        {"file_name": "x\u0000.png", "text": "nul"}, {"file_name": "y" * 5000, "text": "too long"},
    ]
    content = codecs.BOM_UTF8 + "\r\n".join(json.dumps(r) for r in rows).encode() + b'\r\n{"file_name": "sub/c.png", "text": "a\\u2028b"}'
    samples, problems = find_samples(Source(_folder_with(tmp_path, "metadata.jsonl", content)), "fail")
    assert {Path(s.name).name: s.caption for s in samples} == {"a.png": "a cat", "b.png": "", "c.png": "a\u2028b"}
    assert [p.kind for p in problems] == ["orphan_caption", "orphan_caption"]
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    table = b'file_name,text\r\na.png,"a red box,\nstudio"\r\n\r\nb.png,\r\nsub/c.png,"\x00"\r\n'
    samples, problems = find_samples(Source(_folder_with(csv_dir, "metadata.csv", table)), "fail")
    assert [s.caption for s in samples] == ["a red box,\nstudio", "", "\x00"] and problems == []
