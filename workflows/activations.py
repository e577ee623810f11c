"""Activation collection on Ray Data: corpus windows -> frozen-model actor pool -> store or stream.

The driver packs the corpus into context windows (workflows/corpus.py), Ray Data feeds them in
batches to an actor pool of :class:`ActivationMapper` (each holds the frozen model and stops the
forward pass at the deepest hook), and the rows come back to one of two sinks:

- :func:`collect` writes the activation store (sae_core/store.py). Part ``i`` holds windows
  ``[i * part_windows, (i + 1) * part_windows)``, so a killed run started again with the same
  config skips the parts the manifest lists and writes only the rest.
- :func:`stream_activations` / :func:`stream_hook` yield torch batches straight to a trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_core.config import strict_from_dict
from sae_core.store import (
    DTYPES,
    ActivationStore,
    Manifest,
    StoreWriter,
    decode_values,
    encode_values,
    has_manifest,
    make_table,
    read_manifest,
    store_lock,
)
from workflows.corpus import (
    DEFAULT_CORPUS,
    EXCLUDED,
    Windows,
    iter_documents,
    iter_window_chunks,
    pack_windows,
    special_ids,
)
from workflows.errors import UserError
from workflows.hooks import parse_hook, run_with_hooks
from workflows.models import (
    DEFAULT_MODEL,
    MODEL_DTYPES,
    ensure_local,
    load_config,
    load_model,
    load_tokenizer,
)
from workflows.options import DEFAULT_CONTEXT_SIZE
from workflows.raysession import ensure_ray

logger = logging.getLogger(__name__)

META = ("token_id", "window_id", "position", "doc_id")


@dataclass(kw_only=True)
class CollectConfig:
    """What to run, on which text, and where the activations go."""

    hooks: list[str]
    """Hook names to record, e.g. ``["blocks.6.hook_resid_post"]`` (see ``sae hooks``)."""
    n_tokens: int
    """Stored tokens to collect at least (whole windows; BOS and separators are not counted)."""
    model: str = DEFAULT_MODEL
    """``builtin:smollm2-135m-instruct``, a ``.gguf`` file, a model folder or a hub id."""
    corpus: str = DEFAULT_CORPUS
    """``builtin:stdlib``, a .txt/.jsonl/.parquet file, folder or glob, or ``hf:NAME[:CONFIG][:SPLIT]``."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet, hf) holding the text."""
    context_size: int = DEFAULT_CONTEXT_SIZE
    """Tokens per window, BOS included."""
    out: str | None = None
    """Store directory or URI (``s3://bucket/prefix``, ``gs://...``; for :func:`collect`, streaming needs none)."""
    dtype: str = "float32"
    """Storage dtype of the activations: float16, float32 or bfloat16."""
    model_dtype: str = "float32"
    """Dtype the model runs in: float32 or bfloat16."""
    batch_size: int = 16
    """Windows per forward pass."""
    workers: int = 1
    """Actors in the pool, each with its own copy of the model."""
    device: str = "cpu"
    """cpu, or cuda (one GPU per actor)."""
    threads: int | None = None
    """Torch threads per actor; default: the node's cores divided by ``workers``."""
    part_windows: int = 0
    """Windows per store part; 0 picks about 64k tokens per part."""
    cache_dir: str | None = None
    """Model cache folder (default ``$SAE_RAY_CACHE/models`` or ``~/.cache/sae-ray/models``)."""

    def __post_init__(self) -> None:
        if not self.hooks:
            raise UserError("name at least one hook (see `sae hooks`)")
        if len(set(self.hooks)) != len(self.hooks):
            raise UserError(f"hooks are repeated: {self.hooks}")
        for name, value in (("n_tokens", self.n_tokens), ("batch_size", self.batch_size), ("workers", self.workers)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.context_size < 2:
            raise UserError(f"context size must be at least 2 (BOS + one token), got {self.context_size}")
        if self.dtype not in DTYPES:
            raise UserError(f"store dtype {self.dtype!r} is not one of {DTYPES}")
        if self.model_dtype not in MODEL_DTYPES:
            raise UserError(f"model dtype {self.model_dtype!r} is not one of {sorted(MODEL_DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"device must be cpu or cuda, got {self.device!r}")
        if self.part_windows <= 0:
            self.part_windows = max(1, 65536 // self.context_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CollectConfig:
        return strict_from_dict(cls, raw, "collect config")


@dataclass(kw_only=True)
class Plan:
    """The windows to run and the facts the manifest needs, computed on the driver."""

    windows: Windows
    d: dict[str, int]
    bos: int
    sep: int
    pad: int

    @property
    def n_windows(self) -> int:
        return len(self.windows.token_ids)


@dataclass(kw_only=True)
class CollectResult:
    path: str
    n_tokens: int
    parts_written: int
    parts_skipped: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _model_facts(cfg: CollectConfig) -> tuple[dict[str, int], tuple[int, int, int]]:
    """Hook widths (checked against the model config) and the tokenizer's (bos, separator, pad) ids;
    no model weights loaded here."""
    ensure_local(cfg.model, cfg.cache_dir)  # a GGUF converts once here, not in every actor
    config = load_config(cfg.model, cfg.cache_dir)
    n_layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    width = int(getattr(config, "hidden_size", None) or config.n_embd)
    for hook in cfg.hooks:
        parse_hook(hook, n_layers)
    return {h: width for h in cfg.hooks}, special_ids(load_tokenizer(cfg.model, cfg.cache_dir))


def plan(cfg: CollectConfig) -> Plan:
    """Check hooks against the model config and pack the whole corpus in memory (for the live stream;
    :func:`collect` packs as it goes)."""
    d, (bos, sep, pad) = _model_facts(cfg)
    docs = iter_documents(cfg.corpus, text_field=cfg.text_field)
    windows = pack_windows(docs, load_tokenizer(cfg.model, cfg.cache_dir), context_size=cfg.context_size,
                           n_tokens=cfg.n_tokens)
    return Plan(windows=windows, d=d, bos=bos, sep=sep, pad=pad)


class ActivationMapper:
    """Ray Data callable class: holds the frozen model, maps a batch of windows to token rows."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = CollectConfig.from_dict(cfg)
        threads = self.cfg.threads or max(1, (os.cpu_count() or 1) // self.cfg.workers)
        torch.set_num_threads(threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # this process is a Ray actor: no bars interleaved in the driver's log
        loaded = load_model(self.cfg.model, dtype=self.cfg.model_dtype, device=self.cfg.device,
                            cache_dir=self.cfg.cache_dir)
        self.model = loaded.model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        token_ids = torch.from_numpy(np.asarray(batch["token_ids"], dtype=np.int64)).to(self.cfg.device)
        keep_BT = np.asarray(batch["keep"], dtype=bool)
        with torch.inference_mode():
            run = run_with_hooks(self.model, token_ids, capture=self.cfg.hooks)
        rows, cols = np.nonzero(keep_BT)
        out = {
            "token_id": np.asarray(batch["token_ids"])[rows, cols].astype(np.int32),
            "window_id": np.asarray(batch["window_id"], dtype=np.int64)[rows],
            "position": cols.astype(np.int32),
            "doc_id": np.asarray(batch["doc_ids"])[rows, cols].astype(np.int64),
        }
        if "part_rows" in batch:  # collect's stream: the rows each window's part will hold
            out["part_rows"] = np.asarray(batch["part_rows"])[rows]
        keep = torch.from_numpy(keep_BT).to(self.cfg.device)
        for hook in self.cfg.hooks:
            out[hook] = encode_values(run.activations[hook][keep].float().cpu(), self.cfg.dtype)
        return out


def _through_model(cfg: CollectConfig, ds):
    """``ds`` (rows: window_id, token_ids, doc_ids, keep) mapped through the actor pool of frozen models."""
    import ray

    resources = {"num_gpus": 1} if cfg.device == "cuda" else {"num_cpus": 0.5}
    pool = ray.data.ActorPoolStrategy(size=cfg.workers)
    return ds.map_batches(ActivationMapper, fn_constructor_kwargs={"cfg": cfg.to_dict()}, batch_size=cfg.batch_size,
                          compute=pool, batch_format="numpy", **resources)


def activation_dataset(cfg: CollectConfig, windows: Windows, window_ids: np.ndarray):
    """Ray Data dataset of the given windows (packed in memory) mapped through the actor pool."""
    import ray

    ensure_ray()
    items = [{"window_id": int(w), "token_ids": windows.token_ids[w], "doc_ids": windows.doc_ids[w],
              "keep": windows.keep[w]} for w in window_ids]
    blocks = max(1, min(len(items) // cfg.batch_size, 256))
    return _through_model(cfg, ray.data.from_items(items, override_num_blocks=blocks))


def _manifest(cfg: CollectConfig, d: dict[str, int], ids: tuple[int, int, int]) -> Manifest:
    bos, sep, pad = ids
    return Manifest(
        model=cfg.model, hooks={h: {"d": w} for h, w in d.items()}, dtype=cfg.dtype,
        context_size=cfg.context_size, corpus=cfg.corpus, excluded=list(EXCLUDED), bos_token_id=bos,
        extra={"separator_token_id": sep, "pad_token_id": pad, "n_windows": 0, "complete": False,
               "collect": {"n_tokens": cfg.n_tokens, "text_field": cfg.text_field, "part_windows": cfg.part_windows}},
    )


def _open_writer(cfg: CollectConfig, manifest: Manifest) -> tuple[StoreWriter, bool]:
    """The writer, and whether the store is already complete for these settings. A complete store of
    the same settings but fewer tokens grows: its last part is rewritten if it holds fewer windows
    than a part, the next parts are appended."""
    old = read_manifest(cfg.out) if has_manifest(cfg.out) else None
    old_settings = old.extra.get("collect") if old is not None else None
    new_settings = manifest.extra["collect"]
    grows = (old is not None and old.extra.get("complete") and isinstance(old_settings, dict)
             and {**old_settings, "n_tokens": cfg.n_tokens} == new_settings and old_settings["n_tokens"] < cfg.n_tokens)
    if old is not None and old_settings != new_settings and not grows:
        raise UserError(f"{cfg.out} holds a store collected with {old_settings}, not {new_settings}; resume with "
                        "the same settings (a complete store also grows to a larger --tokens), or choose another --out")
    writer = StoreWriter(cfg.out, manifest)
    if grows and old.extra.get("n_windows", 0) % cfg.part_windows:
        writer.forget_part((old.extra["n_windows"] - 1) // cfg.part_windows)
    return writer, old is not None and old_settings == new_settings and bool(old.extra.get("complete"))


def _part_table(chunks: list[dict[str, np.ndarray]], hooks: list[str], dtype: str):
    merged = {k: np.concatenate([c[k] for c in chunks]) for k in [*META, *hooks]}
    order = np.lexsort((merged["position"], merged["window_id"]))
    return make_table({k: merged[k][order] for k in META}, {h: merged[h][order] for h in hooks}, dtype)


def _write_parts(cfg: CollectConfig, writer: StoreWriter, done: set[int], progress: Callable[[int], None]) -> int:
    """Run the parts not in ``done`` through the model as the corpus streams in; returns parts written."""
    from workflows.corpus_stream import window_dataset

    ensure_ray()
    batches = _through_model(cfg, window_dataset(cfg.to_dict(), done)).iter_batches(batch_size=None,
                                                                                    batch_format="numpy")
    try:
        return _assemble_parts(cfg, writer, batches, progress)
    except Exception as exc:  # a bad record deep in the corpus fails the read task: say it as the UserError it is
        cause = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is not None and cause is not exc:
            raise UserError(str(cause).splitlines()[-1]) from None
        raise


def _assemble_parts(cfg: CollectConfig, writer: StoreWriter, batches, progress: Callable[[int], None]) -> int:
    """Buffer rows by part and write each part once all its rows are in; returns parts written."""
    buffers: dict[int, list[dict[str, np.ndarray]]] = {}
    received: dict[int, int] = {}
    written = 0
    for batch in batches:
        part_of = batch["window_id"] // cfg.part_windows
        for i in np.unique(part_of).tolist():
            mine = part_of == i
            buffers.setdefault(i, []).append({k: batch[k][mine] for k in (*META, *cfg.hooks)})
            received[i] = received.get(i, 0) + int(mine.sum())
            if received[i] == int(batch["part_rows"][mine][0]):  # every row of the part is in
                writer.write_part(i, _part_table(buffers.pop(i), cfg.hooks, cfg.dtype))
                written += 1
        progress(len(batch["window_id"]))
    if buffers:
        raise RuntimeError(f"parts {sorted(buffers)} came back incomplete from the actor pool")
    return written


def collect(cfg: CollectConfig, progress: Callable[[int], None] = lambda n: None) -> CollectResult:
    """Write, finish or grow the activation store ``cfg.out``; ``progress(rows)`` is called per batch.

    The corpus is packed as it streams (workflows/corpus_stream.py): the driver holds the parts still
    being assembled, not the corpus.
    """
    if not cfg.out:
        raise UserError("collect needs an output directory (--out)")
    start = time.perf_counter()
    d, ids = _model_facts(cfg)
    # The corpus is read in a Ray task: open it here first, so a missing or empty one is one clean error.
    docs = iter_documents(cfg.corpus, text_field=cfg.text_field)
    next(iter_window_chunks(docs, load_tokenizer(cfg.model, cfg.cache_dir), context_size=cfg.context_size,
                            n_tokens=cfg.n_tokens, chunk_windows=1))
    with store_lock(cfg.out):  # one writer: held from reading the old manifest to the finished store
        writer, complete = _open_writer(cfg, _manifest(cfg, d, ids))
        with writer:
            done = {int(name[len("part-"):-len(".parquet")]) for name in writer.done_parts}
            progress(writer.manifest.n_tokens)
            written = 0 if complete else _write_parts(cfg, writer, done, progress)
            _check_every_part_arrived(writer)
            last = ActivationStore(writer.location.display).read_meta(max(writer.manifest.n_tokens - 1, 0))["window_id"]
            writer.manifest.extra["n_windows"] = int(last[-1]) + 1 if len(last) else 0  # windows holding stored rows
            writer.finish()
    return CollectResult(path=str(writer.root), n_tokens=writer.manifest.n_tokens, parts_written=written,
                         parts_skipped=len(done), seconds=time.perf_counter() - start)


def _check_every_part_arrived(writer: StoreWriter) -> None:
    """Refuse to mark a store complete when its parts are not exactly part-0 .. part-(n-1): a part the actor
    pool never delivered leaves a gap that the rows of the other parts would hide."""
    indices = sorted(int(name[len("part-"):-len(".parquet")]) for name in writer.done_parts)
    missing = sorted(set(range(indices[-1] + 1)) - set(indices)) if indices else []
    if missing:
        raise UserError(f"{writer.location.display}: parts {missing[:5]} never arrived from the actor pool; "
                        "the store stays unfinished, rerun the same `sae collect` to write them")


def complete_manifest(store: str | Path) -> Manifest | None:
    """The manifest of a store `collect` finished writing (a path or URI); None for a missing or unfinished one."""
    if not has_manifest(store):
        return None
    manifest = read_manifest(store)
    return manifest if manifest.extra.get("complete") else None


def stream_activations(cfg: CollectConfig) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches straight from the actor pool, no disk: meta columns and one [n, d] float32 per hook.

    Batches come in completion order, not window order; each row carries its window_id and position.
    """
    p = plan(cfg)
    ds = activation_dataset(cfg, p.windows, np.arange(p.n_windows))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        out = {k: torch.from_numpy(np.array(batch[k])) for k in META}
        out.update({h: decode_values(np.asarray(batch[h]), cfg.dtype) for h in cfg.hooks})
        yield out


def stream_hook(cfg: CollectConfig, hook: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Fixed-size float32 batches [batch_size, d] of one hook, for ``sae_core.trainer`` (rest dropped)."""
    if hook not in cfg.hooks:
        raise UserError(f"hook {hook!r} is not among the collected hooks {cfg.hooks}")
    return rebatch(stream_activations(cfg), hook, batch_size)


def rebatch(batches: Iterator[dict[str, torch.Tensor]], hook: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Cut one hook's rows of ragged batches into fixed [batch_size, d] tensors; a short tail is dropped."""
    pending: list[torch.Tensor] = []
    have = 0
    for batch in batches:
        pending.append(batch[hook])
        have += len(batch[hook])
        while have >= batch_size:
            rows = torch.cat(pending)
            yield rows[:batch_size]
            pending, have = [rows[batch_size:]], have - batch_size
