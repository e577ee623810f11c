"""Labelled text datasets for sparse probing: files, ``hf:`` datasets, and two built-in offline tasks.

The built-in tasks take their labels from where each text comes from, not from a model or a heuristic:

- ``builtin:stdlib-packages``: docstrings (>= 200 characters) of the Python standard library, labelled with
  the package whose source file holds them (``email``, ``asyncio``, ``unittest``, ``xml``, ...). The label is
  the file's path in the installed standard library (the text of the default corpus, ``builtin:stdlib``).
- ``builtin:shakespeare-speakers``: speeches of ``tinyshakespeare.txt`` (the project's shared test data,
  ``../shared/data`` beside the checkout, or ``$SAE_RAY_DATA``), labelled with the speaker heading that
  opens each speech in the text itself ("ROMEO:", "GLOUCESTER:", ...); the most frequent speakers are kept.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any

from workflows.errors import UserError

STDLIB_PACKAGES = ("asyncio", "email", "unittest", "xml", "multiprocessing", "http", "concurrent", "importlib")
SHAKESPEARE_FILE = "tinyshakespeare.txt"
MIN_DOCSTRING = 200
MIN_SPEECH_WORDS = 12


def data_dir() -> Path:
    """``$SAE_RAY_DATA``, else the shared data folder beside this checkout."""
    env = os.environ.get("SAE_RAY_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def stdlib_packages() -> tuple[list[str], list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, labels = [], []
    for package in STDLIB_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "test" in path.relative_to(root).parts[1:-1]:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in [tree, *ast.walk(tree)]:
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_DOCSTRING:
                        texts.append(doc)
                        labels.append(package)
    return texts, labels


def shakespeare_speakers(path: Path | None = None) -> tuple[list[str], list[str]]:
    path = path or data_dir() / SHAKESPEARE_FILE
    if not path.is_file():
        raise UserError(f"builtin:shakespeare-speakers needs {path}; set SAE_RAY_DATA to the folder holding "
                        f"{SHAKESPEARE_FILE}, or choose another task")
    texts, labels = [], []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) < 2 or not lines[0].endswith(":") or lines[0][:-1].upper() != lines[0][:-1]:
            continue
        speech = " ".join(line.strip() for line in lines[1:])
        if len(speech.split()) >= MIN_SPEECH_WORDS:
            texts.append(speech)
            labels.append(lines[0][:-1])
    return texts, labels


def file_task(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise UserError(f"probing task {path}: use a .jsonl or .parquet file, an hf: dataset or a builtin: task")
    missing = [f for f in (text_field, label_field) if rows and f not in rows[0]]
    if missing:
        raise UserError(f"probing task {path} has no field {missing[0]!r}; name it with the text_field/label_field "
                        "options of sparse_probing")
    return [str(r[text_field]) for r in rows], [str(r[label_field]) for r in rows]


def hf_task(spec: str, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    try:
        import datasets
    except ImportError as exc:
        raise UserError(f"{spec} needs the `datasets` package (pip install datasets) and a hub") from exc
    name, config, split = ([*spec[3:].split(":"), None, None])[:3]
    ds = datasets.load_dataset(name, config or None, split=split or "train")
    return [str(t) for t in ds[text_field]], [str(label) for label in ds[label_field]]


BUILTIN = {"builtin:stdlib-packages": stdlib_packages, "builtin:shakespeare-speakers": shakespeare_speakers}


def load_task(spec: str, o: dict[str, Any], *, seed: int = 0) -> tuple[list[str], list[str]]:
    """(texts, labels) of a task, limited to the ``max_classes`` most frequent labels and ``2 * max_per_class``
    texts each (seeded), so every one-vs-rest problem can be balanced."""
    if spec in BUILTIN:
        texts, labels = BUILTIN[spec]()
    elif spec.startswith("hf:"):
        texts, labels = hf_task(spec, o["text_field"], o["label_field"])
    elif spec.startswith("builtin:"):
        raise UserError(f"unknown built-in probing task {spec!r}; choose from {', '.join(BUILTIN)}")
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"probing task {spec!r} is not a file, an hf: dataset or one of {', '.join(BUILTIN)}")
        texts, labels = file_task(path, o["text_field"], o["label_field"])
    keep = [label for label, _ in Counter(labels).most_common(o["max_classes"])]
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in keep:
        idx = [i for i, (t, lab) in enumerate(zip(texts, labels, strict=True)) if lab == label and t.strip()]
        chosen += rng.sample(idx, min(len(idx), 2 * o["max_per_class"]))
    if len(keep) < 2:
        raise UserError(f"probing task {spec!r} has fewer than two labels")
    chosen.sort()
    return [texts[i] for i in chosen], [labels[i] for i in chosen]
