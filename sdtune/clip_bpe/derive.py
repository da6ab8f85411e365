"""Derive CLIP's ``vocab.json`` and ``merges.txt`` from the original BPE file.

OpenAI's CLIP ships one file, ``bpe_simple_vocab_16e6.txt.gz`` (also carried by
the ``open-clip-torch`` wheel). Hugging Face's ``CLIPTokenizer`` reads the same
vocabulary as ``vocab.json`` + ``merges.txt``. The files beside this script were
made once, offline, with::

    python -m sdtune.clip_bpe.derive path/to/bpe_simple_vocab_16e6.txt.gz

so sdtune can build a real CLIP tokenizer with no download and no extra
dependency. The id order follows CLIP's ``SimpleTokenizer``: 256 byte symbols,
the same with the end-of-word mark, one token per merge, then the two specials.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

# CLIP keeps the first 48,894 merges of the file (49152 - 256 - 2), giving a
# vocabulary of exactly 49,408 ids.
N_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def derive(bpe_gz: Path, out_dir: Path) -> tuple[Path, Path]:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return vocab_path, merges_path


if __name__ == "__main__":
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent
    for path in derive(Path(sys.argv[1]), out):
        print(path)
