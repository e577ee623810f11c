"""Text corpora and their packing into fixed context windows.

Corpus specs:

- ``builtin:stdlib`` (the default, no download): real English from the Python standard library. The
  ``.py`` files under the stdlib folder are walked in sorted order (tests, idlelib and site-packages
  left out) and parsed with ``ast`` (nothing is imported); every module, class and function docstring
  of at least 200 characters is a document. Then the long descriptions of the installed
  distributions (``importlib.metadata``, sorted by name), at least 500 characters each. Deterministic for
  one Python version and one environment.
- a file or glob of ``.txt`` (a document per block of text separated by one or more blank lines; a
  file without blank lines is one document), ``.jsonl`` (one JSON object per line, text in
  ``text_field``) or ``.parquet`` (text in column ``text_field``); a folder means every such file in it.
- ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset, streamed (needs ``datasets`` and the hub).

Packing: documents are tokenized without special tokens and concatenated, each followed by the EOS
token (BOS when there is none). Every window of ``context_size`` tokens starts with BOS, followed by
the next ``context_size - 1`` tokens of that stream. BOS, special tokens (the separators) and padding
are excluded: they are fed to the model but not stored.
"""

from __future__ import annotations

import ast
import glob
import importlib.metadata
import itertools
import json
import logging
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from workflows.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = "builtin:stdlib"
EXCLUDED = ["bos", "special", "pad"]
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"}
_MIN_DOCSTRING, _MIN_DESCRIPTION = 200, 500
_SUFFIXES = (".txt", ".jsonl", ".parquet")


class Windows(NamedTuple):
    """Packed context windows; row w is window w."""

    token_ids: np.ndarray
    """[W, T] int32, BOS at position 0."""
    doc_ids: np.ndarray
    """[W, T] int64, the document each token came from (BOS: the document of the next token)."""
    keep: np.ndarray
    """[W, T] bool, the positions that are stored (not BOS, special or padding)."""


def _stdlib_docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_DOCSTRING:
                yield doc


def _package_descriptions() -> Iterator[str]:
    dists = {(d.metadata["Name"] or "").lower(): d for d in importlib.metadata.distributions()}
    for name in sorted(dists):
        text = dists[name].metadata.get_payload() or dists[name].metadata.get("Description") or ""
        if isinstance(text, str) and len(text) >= _MIN_DESCRIPTION:
            yield text


def _txt_documents(path: Path) -> Iterator[str]:
    block: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno} is not valid JSON: {exc.msg}") from exc
            if not isinstance(record, dict) or field not in record:
                raise UserError(f"{path}:{lineno} has no {field!r} field (choose one with --text-field)")
            if record[field]:
                yield str(record[field])


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several kinds for a bad file
        raise UserError(f"cannot read Parquet file {path}: {exc}") from exc
    if field not in parquet.schema_arrow.names:
        raise UserError(f"{path} has no column {field!r}; it has {parquet.schema_arrow.names} (use --text-field)")
    for batch in parquet.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if text:
                yield str(text)


def _hf_documents(spec: str, field: str) -> Iterator[str]:
    parts = spec[len("hf:"):].split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError as exc:
        raise UserError(f"corpus {spec!r} needs the `datasets` package: pip install datasets") from exc
    try:
        data = datasets.load_dataset(name, config, split=split, streaming=True)
        for record in data:
            if field not in record:
                raise UserError(f"dataset {name!r} has no {field!r} field; it has {sorted(record)}")
            if record[field]:
                yield str(record[field])
    except UserError:
        raise
    except Exception as exc:  # offline, unknown name, auth: the hub raises many kinds
        raise UserError(f"cannot stream Hugging Face dataset {name!r} (config={config}, split={split}): {exc}") from exc


def corpus_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"corpus {spec!r} matches no file (expected .txt, .jsonl or .parquet files, "
                        f"'{DEFAULT_CORPUS}' or 'hf:NAME')")
    bad = [str(p) for p in files if p.suffix not in _SUFFIXES]
    if bad:
        raise UserError(f"corpus file(s) {bad[:3]} are not .txt, .jsonl or .parquet")
    return files


def iter_documents(spec: str | None = None, *, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a corpus spec in a deterministic order (see the module docstring)."""
    spec = spec or DEFAULT_CORPUS
    if spec == "builtin:stdlib":
        yield from _stdlib_docstrings()
        yield from _package_descriptions()
        return
    if spec.startswith("builtin:"):
        raise UserError(f"unknown built-in corpus {spec!r}; the built-in is {DEFAULT_CORPUS!r}")
    if spec.startswith("hf:"):
        yield from _hf_documents(spec, text_field)
        return
    for path in corpus_files(spec):
        try:
            if path.suffix == ".txt":
                yield from _txt_documents(path)
            elif path.suffix == ".jsonl":
                yield from _jsonl_documents(path, text_field)
            else:
                yield from _parquet_documents(path, text_field)
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read corpus file {path}: {exc}") from exc


def _token_stream(docs: Iterator[str], tokenizer: Any, sep_id: int, chunk: int = 64) -> Iterator[tuple[list[int], int]]:
    """(token ids + separator, doc_id) per non-empty document, tokenized in chunks for speed."""
    doc_id = 0
    while True:
        texts = list(itertools.islice(docs, chunk))
        if not texts:
            return
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            if ids:
                yield [*ids, sep_id], doc_id
                doc_id += 1


def special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(bos, separator, pad) ids; a tokenizer without BOS cannot mark window starts."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise UserError("the tokenizer has neither a BOS nor an EOS token to start windows with")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    return int(bos), int(sep), int(pad)


def iter_window_chunks(docs: Iterator[str], tokenizer: Any, *, context_size: int, n_tokens: int,
                       chunk_windows: int = 512) -> Iterator[Windows]:
    """Pack documents into windows as a stream, ``chunk_windows`` windows at a time, until at least
    ``n_tokens`` stored (kept) positions: memory holds one chunk, not the corpus.

    If the corpus runs out first, the last window is padded and a warning says how many tokens there
    were; an empty corpus is a UserError.
    """
    if context_size < 2:
        raise UserError(f"context size must be at least 2 (BOS + one token), got {context_size}")
    bos, sep, pad = special_ids(tokenizer)
    specials = np.array(sorted(set(getattr(tokenizer, "all_special_ids", [])) | {bos, sep, pad}), dtype=np.int64)
    body = context_size - 1
    tokens: list[int] = []
    docs_of: list[int] = []
    kept = 0
    stream = _token_stream(iter(docs), tokenizer, sep)
    exhausted = False
    while kept < n_tokens and not exhausted:
        while len(tokens) < chunk_windows * body:
            item = next(stream, None)
            if item is None:
                exhausted = True
                break
            tokens.extend(item[0])
            docs_of.extend([item[1]] * len(item[0]))
        if not tokens:
            if kept == 0:
                raise UserError("the corpus holds no text (empty files or all records empty)")
            break
        n_windows = len(tokens) // body if not exhausted else -(-len(tokens) // body)
        chunk = _windows(tokens[: n_windows * body], docs_of[: n_windows * body], n_windows, body, bos, pad, specials)
        del tokens[: n_windows * body], docs_of[: n_windows * body]
        cumulative = kept + np.cumsum(chunk.keep.sum(axis=1))
        n_used = int(np.searchsorted(cumulative, n_tokens) + 1) if cumulative[-1] >= n_tokens else n_windows
        kept = int(cumulative[n_used - 1])
        yield Windows(*(a[:n_used] for a in chunk))
    if kept < n_tokens:
        logger.warning("the corpus holds only %d tokens, fewer than the %d asked for", kept, n_tokens)


def _windows(tokens: list[int], docs_of: list[int], n_windows: int, body: int, bos: int, pad: int,
             specials: np.ndarray) -> Windows:
    """``n_windows`` windows of BOS + ``body`` tokens (the last padded if the tokens run short)."""
    stream = np.full(n_windows * body, pad, dtype=np.int64)
    stream[: len(tokens)] = tokens
    stream_docs = np.full(n_windows * body, docs_of[-1], dtype=np.int64)
    stream_docs[: len(docs_of)] = docs_of
    token_ids = np.concatenate([np.full((n_windows, 1), bos), stream.reshape(n_windows, body)], axis=1)
    doc_ids = stream_docs.reshape(n_windows, body)
    doc_ids = np.concatenate([doc_ids[:, :1], doc_ids], axis=1)
    real = (np.arange(n_windows * body) < len(tokens)).reshape(n_windows, body)
    keep = np.concatenate([np.zeros((n_windows, 1), dtype=bool), real], axis=1) & ~np.isin(token_ids, specials)
    return Windows(token_ids.astype(np.int32), doc_ids, keep)


def pack_windows(docs: Iterator[str], tokenizer: Any, *, context_size: int, n_tokens: int) -> Windows:
    """All windows of :func:`iter_window_chunks` in memory at once."""
    chunks = list(iter_window_chunks(docs, tokenizer, context_size=context_size, n_tokens=n_tokens))
    return Windows(*(np.concatenate(parts) for parts in zip(*chunks, strict=True)))
