"""Offline assets bundled with the package: the GPT-2 tokenizer and a small corpus.

See ``README.md`` in this folder for sources, licenses and checksums.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
SOTU_DIR = ASSETS_DIR / "sotu"
SOTU_SPLITS = ("train", "validation")


def sotu_file(split: str) -> Path:
    """Return the bundled State of the Union file for ``split`` (``train`` or ``validation``)."""
    if split not in SOTU_SPLITS:
        raise ValueError(f"bundled:sotu has splits {SOTU_SPLITS}, not {split!r}; pick one of them")
    return SOTU_DIR / f"{split}.jsonl.gz"
