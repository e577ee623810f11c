"""Corpus sources and window packing."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerFast

from workflows.corpus import corpus_files, iter_documents, pack_windows, special_ids
from workflows.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)


def test_txt_is_one_document_per_blank_line_block(shakespeare):
    docs = list(itertools.islice(iter_documents(str(shakespeare)), 3))
    assert docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert docs[1] == "All:\nSpeak, speak."
    assert all("\n\n" not in d for d in docs)


def test_jsonl_parquet_glob_and_folder(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(3)) + "\n")
    pq.write_table(pa.table({"body": ["p0", None, "p1"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("t0\n\n\nt1 line1\nt1 line2\n")
    every = ["doc 0", "doc 1", "doc 2", "p0", "p1", "t0", "t1 line1\nt1 line2"]
    assert list(iter_documents(str(tmp_path), text_field="body")) == every
    assert list(iter_documents(str(tmp_path / "*.parquet"), text_field="body")) == ["p0", "p1"]
    assert [p.name for p in corpus_files(str(tmp_path / "[ab].*"))] == ["a.jsonl", "b.parquet"]


def test_bad_corpora_are_clear_user_errors(tmp_path, tokenizer):
    (tmp_path / "x.jsonl").write_text('{"content": "hello"}\n')
    with pytest.raises(UserError, match="no 'text' field"):
        list(iter_documents(str(tmp_path / "x.jsonl")))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "y.parquet")
    with pytest.raises(UserError, match="no column 'text'"):
        list(iter_documents(str(tmp_path / "y.parquet")))
    (tmp_path / "z.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot read Parquet"):
        list(iter_documents(str(tmp_path / "z.parquet")))
    with pytest.raises(UserError, match="matches no file"):
        list(iter_documents(str(tmp_path / "nothing-*.txt")))
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(UserError, match="not .txt"):
        list(iter_documents(str(tmp_path / "notes.md")))
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(UserError, match="holds no text"):
        pack_windows(iter_documents(str(tmp_path / "empty.txt")), tokenizer, context_size=8, n_tokens=10)
    with pytest.raises(UserError, match="built-in"):
        list(iter_documents("builtin:wikipedia"))


def test_hf_datasets_offline_is_a_clear_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="datasets|Hugging Face dataset"):
        next(iter_documents("hf:roneneldan/TinyStories::train"))


def test_builtin_stdlib_is_deterministic_english():
    first = list(itertools.islice(iter_documents("builtin:stdlib"), 100))
    again = list(itertools.islice(iter_documents(None), 100))
    assert first == again and len(set(first)) > 90
    words = " ".join(first).split()
    assert len(words) > 5_000
    assert sum(w.lower() in {"the", "a", "of", "is", "to"} for w in words) / len(words) > 0.05


def test_pack_windows_layout(shakespeare, tokenizer):
    bos, sep, _ = special_ids(tokenizer)
    docs = list(itertools.islice(iter_documents(str(shakespeare)), 400))
    w = pack_windows(iter(docs), tokenizer, context_size=16, n_tokens=1000)
    assert w.token_ids.dtype == np.int32 and w.token_ids.shape[1] == 16
    assert (w.token_ids[:, 0] == bos).all() and not w.keep[:, 0].any()
    assert not w.keep[w.token_ids == sep].any()
    kept = w.keep.sum(axis=1)
    assert kept.sum() >= 1000 and kept[:-1].sum() < 1000  # whole windows, no more than needed
    # The window bodies, read in order, are the documents with separators between them.
    stream = w.token_ids[:, 1:].reshape(-1)
    expected = [t for d in docs for t in [*tokenizer(d, add_special_tokens=False)["input_ids"], sep]]
    assert stream.tolist() == expected[: len(stream)]
    body_docs = w.doc_ids[:, 1:].reshape(-1)
    assert (np.diff(body_docs) >= 0).all() and body_docs[0] == 0
    assert (w.doc_ids[:, 0] == w.doc_ids[:, 1]).all()


def test_short_corpus_pads_the_last_window(tmp_path, tokenizer, caplog):
    (tmp_path / "s.txt").write_text("one two three\n\nfour five\n")
    with caplog.at_level(logging.WARNING):
        w = pack_windows(iter_documents(str(tmp_path / "s.txt")), tokenizer, context_size=64, n_tokens=500)
    assert "fewer than" in caplog.text
    assert len(w.token_ids) == 1 and 0 < w.keep.sum() < 20
    _, _, pad = special_ids(tokenizer)
    assert w.token_ids[0, -1] == pad and not w.keep[0, -1]
