"""Where a training job's data comes from. Every source offers the same small interface:

- ``widths()``: width of each model site the job reads (sets d_in, and d_out / n_sources);
- ``facts()``: what the saved SAE's metadata says about the data (model, context size, corpus, ...);
- ``datasets()``: Ray datasets the driver hands to Ray Train, or None when ranks read the source themselves;
- ``batches(rank, world, skip)``: rank ``rank``'s slice of each global batch, from global batch ``skip`` on
  (so N ranks together see what one would, and a resumed run continues where it stopped);
- ``init_sample(n)`` and ``held_out()``: examples to initialise from and to evaluate on (sources of
  activations; a source of token windows leaves that to the objective, which runs the model).

Three sources: an activation store (:class:`StoreSource`), activations streamed from the model by Ray
Data actors (:class:`StreamSource`), token windows of text (:class:`WindowSource`, for objectives that
run the model themselves). A source is built on the driver and shipped to the workers whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sae_core.architectures.base import Wiring
from sae_core.store import ActivationStore, StoreError, decode_values
from workflows.corpus import DEFAULT_CORPUS, Windows, iter_documents, pack_windows
from workflows.errors import UserError
from workflows.job import TrainJob

DATA_MODES = ("direct", "ray")


@dataclass(frozen=True)
class DataFacts:
    """What the SAELens metadata records about the data an SAE was trained on."""

    model_name: str
    context_size: int
    dataset_path: str
    prepend_bos: bool = True
    exclude_special_tokens: bool = True


def examples(job: TrainJob, columns: dict[str, torch.Tensor]):
    """What the trainer takes, from equal-length per-site tensors: x [N, D]; a STACKED wiring's [N, S, D]
    stack of its sites; a PAIR wiring's (input, target)."""
    wiring = job.wiring
    if wiring is Wiring.STACKED:
        return torch.stack([columns[h] for h in job.sources], dim=1)
    x = columns[job.hook]
    return (x, columns[job.out_hook]) if wiring is Wiring.PAIR else x


def check_rows_split(job: TrainJob, world: int) -> None:
    if job.train.batch_size % world:
        raise UserError(f"--batch-size {job.train.batch_size} is not divisible by --workers {world}")


def shard_batches(job: TrainJob, world: int, dtype: str = "float32") -> Iterator[Any]:
    """This worker's Ray Data shard, in seeded local-shuffle epochs (Ray Train hands out the shards);
    columns stored as ``dtype`` (a store's bfloat16 bits) are decoded to float32."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    local, epoch = job.train.batch_size // world, 0
    while True:
        for batch in shard.iter_torch_batches(batch_size=local, drop_last=True, local_shuffle_buffer_size=16 * local,
                                              local_shuffle_seed=job.train.seed + epoch):
            yield examples(job, {h: decode_values(batch[h].cpu().numpy(), dtype) for h in job.sites()})
        epoch += 1


def ready_store(root: str, *, verify: bool = False) -> ActivationStore:
    """The store at ``root``, refused unless its writer finished it and every part has the byte size its
    manifest records (with ``verify`` also the sha256, rows and schema: ``sae store verify``)."""
    store = ActivationStore(root)
    try:
        store.check_ready(verify=verify)
    except StoreError as exc:
        fix = ("finish it by rerunning the `sae collect` (or `sae synth`) that writes it"
               if exc.reason == "incomplete" else f"see `sae store verify {root}`, and collect the store again")
        raise UserError(f"{exc}; {fix}") from None
    return store


class StoreSource:
    """An activation store, finished and checked (:func:`ready_store`): the last ``eval_fraction`` of its
    rows are held out."""

    def __init__(self, job: TrainJob, data: str = "direct"):
        self.job, self.data = job, data
        self.store = ready_store(job.activations)
        for site in job.sites():
            self.store.check_hook(site)
        total = self.store.n_tokens
        n_eval = max(int(total * job.eval_fraction), 1)
        if total - n_eval < job.train.batch_size:
            raise UserError(f"store {job.activations} has {total} rows: too few for a batch of {job.train.batch_size} "
                            f"plus {n_eval} held-out rows; collect more tokens or lower --batch-size")
        self.train_rows, self.total = total - n_eval, total

    def widths(self) -> dict[str, int]:
        return {site: self.store.d(site) for site in self.job.sites()}

    def check_world(self, world: int) -> None:
        check_rows_split(self.job, world)

    def facts(self) -> DataFacts:
        m = self.store.manifest
        return DataFacts(model_name=m.model, context_size=m.context_size, dataset_path=m.corpus,
                         prepend_bos=m.bos_token_id is not None, exclude_special_tokens=bool(m.excluded))

    def datasets(self) -> dict[str, Any] | None:
        if self.data != "ray":
            return None
        import ray.data

        fs, paths = self.store.part_paths()
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # limit() keeps the training rows
        ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(self.job.sites()).limit(self.train_rows)
        return {"train": ds}

    def batches(self, rank: int, world: int, skip: int) -> Iterator[Any]:
        if self.data == "ray":
            return shard_batches(self.job, world, self.store.manifest.dtype)
        cfg = self.job.train
        rows = self.store.iter_batches(self.job.sites(), cfg.batch_size, seed=cfg.seed, stop=self.train_rows,
                                       rank=rank, world=world, skip_batches=skip)
        return (examples(self.job, columns) for columns in rows)

    def rows(self, start: int, stop: int):
        return examples(self.job, {site: self.store.read_hook(site, start, stop) for site in self.job.sites()})

    def init_sample(self, n_tokens: int):
        return self.rows(0, min(n_tokens, self.train_rows))

    def held_out(self):
        return self.rows(self.train_rows, self.total)


class StreamSource:
    """Activations of the live model, run by Ray Data actors: the last ``eval_fraction`` of the windows are
    held out (run once at the end); the training windows are re-run through the model every epoch."""

    def __init__(self, job: TrainJob):
        from workflows.activations import CollectConfig, plan

        self.job = job
        self.cfg = CollectConfig.from_dict({**(job.stream or {}), "hooks": job.sites()})
        self.plan = plan(self.cfg)
        n = self.plan.n_windows
        n_eval = max(1, int(n * job.eval_fraction))
        if n - n_eval < 1:
            raise UserError(f"--tokens {self.cfg.n_tokens} gives {n} window(s): too few to hold some out; raise --tokens")
        self.train_ids, self.eval_ids = np.arange(n - n_eval), np.arange(n - n_eval, n)

    def widths(self) -> dict[str, int]:
        return dict(self.plan.d)

    def check_world(self, world: int) -> None:
        check_rows_split(self.job, world)

    def facts(self) -> DataFacts:
        return DataFacts(model_name=self.cfg.model, context_size=self.cfg.context_size, dataset_path=self.cfg.corpus)

    def datasets(self) -> dict[str, Any]:
        from workflows.activations import activation_dataset

        return {"train": activation_dataset(self.cfg, self.plan.windows, self.train_ids)}

    def batches(self, rank: int, world: int, skip: int) -> Iterator[Any]:
        return shard_batches(self.job, world, self.cfg.dtype)

    def init_sample(self, n_tokens: int):
        return None  # the trainer initialises from its first batch

    def held_out(self):
        from workflows.activations import activation_dataset

        ds = activation_dataset(self.cfg, self.plan.windows, self.eval_ids)
        batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        return examples(self.job, {h: torch.cat([decode_values(np.asarray(b[h]), self.cfg.dtype) for b in batches])
                                   for h in self.job.sites()})


class WindowSource:
    """Token windows of text, for objectives that run the model themselves (end-to-end): each step takes
    ``batch_size // context_size`` windows; the text after the training windows is held out."""

    def __init__(self, job: TrainJob):
        from workflows.activations import CollectConfig
        from workflows.models import load_config, load_tokenizer

        self.job = job
        self.cfg = CollectConfig.from_dict({**(job.stream or {}), "hooks": job.sites()})
        self.per_step = job.train.batch_size // self.cfg.context_size
        if self.per_step < 1:
            raise UserError(f"--batch-size {job.train.batch_size} is less than one window of --context-size "
                            f"{self.cfg.context_size}; raise --batch-size")
        config = load_config(self.cfg.model, self.cfg.cache_dir)
        self.n_layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
        self.width = int(getattr(config, "hidden_size", None) or config.n_embd)
        docs = iter_documents(self.cfg.corpus, text_field=self.cfg.text_field)
        self.windows = pack_windows(docs, load_tokenizer(self.cfg.model, self.cfg.cache_dir),
                                    context_size=self.cfg.context_size, n_tokens=self.cfg.n_tokens)
        if len(self.windows.token_ids) < self.per_step:
            raise UserError(f"--tokens {self.cfg.n_tokens} gives {len(self.windows.token_ids)} window(s), fewer than "
                            f"a step's {self.per_step}; raise --tokens or lower --batch-size")
        self.train_tokens = int(self.windows.keep.sum())

    def widths(self) -> dict[str, int]:
        return dict.fromkeys(self.job.sites(), self.width)

    def check_world(self, world: int) -> None:
        if self.per_step % world:
            raise UserError(f"a step of {self.per_step} window(s) (--batch-size {self.job.train.batch_size} / "
                            f"--context-size {self.cfg.context_size}) does not split over --workers {world}")

    def facts(self) -> DataFacts:
        return DataFacts(model_name=self.cfg.model, context_size=self.cfg.context_size, dataset_path=self.cfg.corpus)

    def datasets(self) -> None:
        return None

    def batches(self, rank: int, world: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return window_batches(self.windows, per_step=self.per_step, seed=self.job.train.seed, rank=rank, world=world,
                              skip=skip)

    def held_out_windows(self, tokenizer: Any, n_tokens: int) -> Windows:
        from workflows.evaluate import held_out_windows

        return held_out_windows(tokenizer, corpus=self.cfg.corpus, context_size=self.cfg.context_size,
                                n_tokens=n_tokens, skip_tokens=self.train_tokens, text_field=self.cfg.text_field)


def window_batches(windows: Windows, *, per_step: int, seed: int, rank: int, world: int,
                   skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids_BT, keep_BT) of this rank's slice of each global batch of ``per_step`` windows, epochs in seeded
    orders; the first ``skip`` global batches (already trained on before a resume) are passed over."""
    local, n = per_step // world, len(windows.token_ids)
    index, epoch = 0, 0
    while True:
        order = np.random.default_rng(seed + epoch).permutation(n)
        for start in range(0, n - per_step + 1, per_step):
            if index >= skip:
                pick = order[start : start + per_step][rank * local : (rank + 1) * local]
                yield (torch.from_numpy(windows.token_ids[pick].astype(np.int64)), torch.from_numpy(windows.keep[pick]))
            index += 1
        epoch += 1


def make_source(job: TrainJob, needs: str, data: str = "direct") -> StoreSource | StreamSource | WindowSource:
    """The source of ``job`` for an objective that ``needs`` "activations" or "windows"."""
    if data not in DATA_MODES:
        raise UserError(f"data must be one of {DATA_MODES}, got {data!r}")
    if needs == "windows":
        if data != "direct":
            raise UserError(f"--loss {job.loss} reads token windows directly; drop --data ray")
        return WindowSource(job)
    if job.activations:
        return StoreSource(job, data)
    return StreamSource(job)


def default_stream(model: str, n_tokens: int, context_size: int, corpus: str | None = None,
                   text_field: str = "text") -> dict[str, Any]:
    """The ``stream`` of a job that runs ``model`` over ``corpus`` (default: the embedded corpus)."""
    return {"model": model, "corpus": corpus or DEFAULT_CORPUS, "n_tokens": n_tokens, "context_size": context_size,
            "text_field": text_field}
