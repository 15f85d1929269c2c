"""Data pipeline: text sources, deterministic per-miner shards and fixed-size token blocks.

Every block is addressed by ``(shard, block_index)``: for a given dataset, split,
tokenizer, ``block_size``, ``num_shards`` and ``seed``, block ``k`` of a shard is always
the same tokens, so a validator can recompute a miner's batch from its index.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hivetrain.assets import sotu_file
from hivetrain.log import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)

BUNDLED_DATASET = "bundled:sotu"
TOKENIZE_BATCH_DOCS = 32
SHUFFLE_BUFFER_DOCS = 1024

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}


def _builder_for(path: Path) -> str | None:
    """The ``datasets`` builder for a data file (``x.jsonl.gz`` -> ``json``), or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return _SUFFIX_BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_like_path(dataset: str) -> bool:
    return dataset.startswith(("/", "./", "../", "~")) or _builder_for(Path(dataset)) is not None


def _local_data_files(path: Path, split: str) -> tuple[str, list[str]]:
    """Builder and files for a local file or folder; in a folder, files named ``<split>*`` win."""
    if path.is_file():
        files = [path] if _builder_for(path) else []
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and _builder_for(p) and not p.name.startswith("."))
        matching = [p for p in files if p.name.startswith(split)]
        if matching:
            files = matching
        elif split != "train":
            raise ValueError(f"no file named '{split}*' in {path}; name the {split} files e.g. '{split}.jsonl'")
    if not files:
        raise ValueError(f"no .json/.jsonl/.txt/.parquet data (optionally .gz) in {path}")
    builders = {_builder_for(p) for p in files}
    if len(builders) != 1:
        raise ValueError(f"{path} mixes file types {sorted(builders)}; keep one type of data file per folder")
    return builders.pop(), [str(p) for p in files]


def _bundled_rows(split: str) -> Iterator[dict]:
    """The bundled corpus's rows, read as the JSON lines they are (no ``datasets`` import: a miner on the bundled
    data starts a second sooner); the same rows, in the same order, as ``datasets``' JSON loader gives."""
    with gzip.open(sotu_file(split), "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _open_dataset(dataset: str, split: str) -> Iterable[dict]:
    if dataset.startswith("bundled:"):
        if dataset != BUNDLED_DATASET:
            raise ValueError(f"unknown bundled dataset {dataset!r}; the only one is {BUNDLED_DATASET!r}")
        sotu_file(split)  # an unknown split fails here, when the dataset is opened
        return _bundled_rows(split)
    import datasets  # a second of imports: only for data other than the bundled corpus

    path = Path(dataset).expanduser()
    if path.exists():
        builder, files = _local_data_files(path, split)
        # Paragraphs keep .txt documents whole enough to read, yet many enough to shard.
        kwargs = {"sample_by": "paragraph", "keep_linebreaks": True} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=True, **kwargs)
    if _looks_like_path(dataset):
        raise ValueError(f"data path {dataset!r} does not exist; fix the path or use {BUNDLED_DATASET!r}")
    try:
        return datasets.load_dataset(dataset, split=split, streaming=True)
    except Exception as exc:  # hub/network boundary: any failure becomes a fix-it message
        raise ValueError(
            f"could not open dataset {dataset!r} split {split!r} ({type(exc).__name__}: {exc}); the Hugging Face "
            f"hub may be unreachable or the name is wrong. {BUNDLED_DATASET!r} works offline."
        ) from exc


def _iter_column(rows: Iterable[dict], text_key: str, dataset: str) -> Iterator[str]:
    for row in rows:
        if text_key not in row:
            raise ValueError(f"dataset {dataset!r} has no column {text_key!r}; its columns are {sorted(row)}")
        text = row[text_key]
        if text:  # empty rows would only add a stray EOS
            yield text


def load_texts(dataset: str = BUNDLED_DATASET, split: str = "train", text_key: str = "text") -> Iterator[str]:
    """Stream the non-empty documents of ``dataset``/``split`` as strings (one pass).

    ``dataset`` is ``bundled:sotu`` (offline, splits ``train``/``validation``), a local
    .json/.jsonl/.txt/.parquet file or folder (optionally .gz; .txt is split into
    paragraphs), or a Hugging Face hub name such as ``tiiuae/falcon-refinedweb`` (with
    ``text_key="content"``), which needs the hub. Opening fails fast with ValueError.
    """
    return _iter_column(_open_dataset(dataset, split), text_key, dataset)


def _check_num_shards(num_shards: int) -> None:
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an integer >= 1, got {num_shards!r}")


def _check_shard(num_shards: int, shard: int) -> None:
    _check_num_shards(num_shards)
    if not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be an integer in [0, {num_shards}), got {shard!r}")


#: Tag in front of what ``shard_for`` hashes: another encoding would take another tag, so the two never collide.
SHARD_DOMAIN = "hivetrain-shard/1"


def shard_for(hotkey: str, salt: str, num_shards: int) -> int:
    """The shard a miner trains on: sha256 of (domain, run salt, hotkey), first 8 bytes big-endian, mod ``num_shards``.

    The peer id is deliberately no input: minting libp2p keys is free, so a miner could grind ids
    until one lands in the shard it wants (e.g. a victim's). A hotkey costs a registration, and the
    salt is chosen per run by a trusted service (``hivetrain.store.shard_salt``): grinding costs a
    registration per try and cannot start before the run does. Newlines delimit the fields (neither
    a salt nor an ss58 hotkey holds one).
    """
    _check_num_shards(num_shards)
    for name, value in (("hotkey", hotkey), ("salt", salt)):
        if not isinstance(value, str) or not value or "\n" in value:
            raise ValueError(f"{name} must be a non-empty one-line string, got {value!r}")
    digest = hashlib.sha256(f"{SHARD_DOMAIN}\n{salt}\n{hotkey}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_texts(texts: Iterable[str], num_shards: int, shard: int) -> Iterator[str]:
    """Documents of one shard: document ``i`` belongs to shard ``i % num_shards``."""
    _check_shard(num_shards, shard)
    return itertools.islice(texts, shard, None, num_shards)


def buffer_shuffle(items: Iterable, seed: str, buffer_size: int = SHUFFLE_BUFFER_DOCS) -> Iterator:
    """Deterministic streaming shuffle through a buffer of ``buffer_size`` items.

    Seeding ``random.Random`` with a string is stable across processes, so the same
    ``seed`` gives the same order on every peer, whether items are streamed or in memory.
    """
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    rng = random.Random(seed)
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def tokenize_documents(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, batch_docs: int = TOKENIZE_BATCH_DOCS
) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS, tokenizing ``batch_docs`` documents at a time."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; use hivetrain.tokenizer.load_tokenizer()")
    texts = iter(texts)
    while batch := list(itertools.islice(texts, batch_docs)):
        # verbose=False: documents longer than model_max_length are expected; blocks cut them.
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            yield ids + [eos]


def iter_blocks(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, block_size: int = 512
) -> Iterator[torch.Tensor]:
    """Concatenate documents (EOS after each) and cut into int64 blocks of ``block_size`` ids.

    The final partial block is dropped.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    buffer: list[int] = []
    for ids in tokenize_documents(texts, tokenizer):
        buffer.extend(ids)
        full = len(buffer) // block_size * block_size
        for start in range(0, full, block_size):
            yield torch.tensor(buffer[start : start + block_size], dtype=torch.int64)  # (T,)
        del buffer[:full]


class BlockStream:
    """Endless, addressable stream of ``(block_index, LongTensor[block_size])`` for one shard.

    The shard's documents are read pass after pass; with a ``seed`` each pass visits
    them in a new deterministic order (``buffer_shuffle``), with ``seed=None`` in file
    order. Every pass holds the same number of blocks (its remainder is dropped), so
    block ``k`` is a pure function of the configuration. ``materialize`` keeps the
    shard's token ids in memory (default for ``bundled:sotu``); otherwise blocks are
    recomputed by streaming, which gives the same blocks more slowly.
    """

    def __init__(
        self,
        dataset: str = BUNDLED_DATASET,
        split: str = "train",
        text_key: str = "text",
        tokenizer: PreTrainedTokenizerBase | None = None,
        block_size: int = 512,
        num_shards: int = 1,
        shard: int = 0,
        seed: int | None = 0,
        materialize: bool | None = None,
    ) -> None:
        _check_shard(num_shards, shard)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if tokenizer is None:
            from hivetrain.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self.dataset, self.split, self.text_key = dataset, split, text_key
        self.tokenizer, self.block_size = tokenizer, block_size
        self.num_shards, self.shard, self.seed = num_shards, shard, seed
        self.materialize = dataset == BUNDLED_DATASET if materialize is None else materialize
        self._docs: list[torch.Tensor] | None = None  # per document: int32 ids + EOS
        self._pass_cache: tuple[int, torch.Tensor] | None = None
        self._blocks_per_pass: int | None = None

    def __repr__(self) -> str:
        return f"BlockStream({self.dataset}[{self.split}], shard {self.shard}/{self.num_shards}, T={self.block_size})"

    def _shard_texts(self) -> Iterator[str]:
        return shard_texts(load_texts(self.dataset, self.split, self.text_key), self.num_shards, self.shard)

    def _pass_order(self, items: Iterable, pass_index: int) -> Iterable:
        return items if self.seed is None else buffer_shuffle(items, f"{self.seed}:{pass_index}")

    def _empty_error(self, tokens: int) -> ValueError:
        return ValueError(
            f"{self!r} has {tokens} tokens, less than one block; use fewer shards, a smaller block_size "
            f"or a bigger dataset"
        )

    def _load_docs(self) -> list[torch.Tensor]:
        if self._docs is None:
            token_ids = tokenize_documents(self._shard_texts(), self.tokenizer)
            docs = [torch.tensor(ids, dtype=torch.int32) for ids in token_ids]
            tokens = sum(len(d) for d in docs)
            if tokens < self.block_size:
                raise self._empty_error(tokens)
            self._docs, self._blocks_per_pass = docs, tokens // self.block_size
            logger.info(
                "%r: %d documents, %d tokens, %d blocks per pass", self, len(docs), tokens, self._blocks_per_pass
            )
        return self._docs

    @property
    def blocks_per_pass(self) -> int | None:
        """Blocks in one pass over the shard (None while a streamed shard has not finished a pass)."""
        if self.materialize:
            self._load_docs()
        return self._blocks_per_pass

    def _pass_tokens(self, pass_index: int) -> torch.Tensor:
        """All token ids of one pass, in that pass's document order. (N,) int32"""
        if self._pass_cache is None or self._pass_cache[0] != pass_index:
            docs = self._load_docs()
            order = self._pass_order(range(len(docs)), pass_index)
            self._pass_cache = (pass_index, torch.cat([docs[i] for i in order]))
        return self._pass_cache[1]

    def _check_index(self, block_index: int) -> None:
        if not isinstance(block_index, int) or block_index < 0:
            raise ValueError(f"block_index must be an integer >= 0, got {block_index!r}")

    def get_block(self, block_index: int) -> torch.Tensor:
        """Block ``block_index`` of this shard as int64 ``(block_size,)``."""
        self._check_index(block_index)
        if not self.materialize:
            return next(self.iter_from(block_index, log=False))[1]
        pass_index, offset = divmod(block_index, self.blocks_per_pass)
        start = offset * self.block_size
        return self._pass_tokens(pass_index)[start : start + self.block_size].to(torch.int64)

    def get_batch(self, start_index: int, batch_size: int) -> torch.Tensor:
        """Blocks ``start_index .. start_index + batch_size - 1`` stacked as int64 ``(B, T)``."""
        self._check_index(start_index)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.materialize:
            return torch.stack([self.get_block(start_index + i) for i in range(batch_size)])
        blocks = itertools.islice(self.iter_from(start_index, log=False), batch_size)
        return torch.stack([block for _, block in blocks])

    def iter_from(self, start_index: int = 0, log: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(block_index, block)`` forever, starting at ``start_index``."""
        self._check_index(start_index)
        if self.materialize:
            for index in itertools.count(start_index):
                if log and (index == start_index or index % self.blocks_per_pass == 0):
                    logger.info("%r: pass %d from block %d", self, index // self.blocks_per_pass, index)
                yield index, self.get_block(index)
        else:
            yield from self._stream_from(start_index, log)

    def _stream_from(self, start_index: int, log: bool) -> Iterator[tuple[int, torch.Tensor]]:
        per_pass = self._blocks_per_pass
        pass_index = start_index // per_pass if per_pass else 0
        index = pass_index * per_pass if per_pass else 0
        while True:
            if log:
                logger.info("%r: pass %d from block %d", self, pass_index, max(index, start_index))
            count = 0
            texts = self._pass_order(self._shard_texts(), pass_index)
            for block in iter_blocks(texts, self.tokenizer, self.block_size):
                if index >= start_index:
                    yield index, block
                index, count = index + 1, count + 1
            if count == 0:
                raise self._empty_error(0)
            self._blocks_per_pass = count
            pass_index += 1

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        return self.iter_from(0)

    def batches(self, batch_size: int, start_index: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first_block_index, LongTensor (B, T))`` of consecutive blocks, forever."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        blocks = self.iter_from(start_index)
        while True:
            group = list(itertools.islice(blocks, batch_size))
            yield group[0][0], torch.stack([block for _, block in group])  # (B, T)


def validation_blocks(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_blocks: int,
    dataset: str = BUNDLED_DATASET,
    text_key: str = "text",
) -> torch.Tensor:
    """The first ``max_blocks`` blocks of the validation split, unshuffled: LongTensor ``(N, T)``.

    N is smaller than ``max_blocks`` when the split is short; an empty split is an error.
    """
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    texts = load_texts(dataset, "validation", text_key)
    blocks = list(itertools.islice(iter_blocks(texts, tokenizer, block_size), max_blocks))
    if not blocks:
        raise ValueError(f"validation split of {dataset!r} has less than one block of {block_size} tokens")
    if len(blocks) < max_blocks:
        logger.info("validation split of %r has only %d blocks of %d tokens", dataset, len(blocks), block_size)
    return torch.stack(blocks)  # (N, T)
