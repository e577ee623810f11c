"""``sae bench`` on Ray: many SAEs, a pool of actors each holding one model copy, results into MLflow and
each SAE's folder.

The driver sorts the SAEs by (model, hook) and hands them to :class:`BenchWorker` actors (fractional
CPUs, or a GPU each). An actor keeps the models and held-out windows it loaded, and one ``shared`` cache
per (model, hook) of SAE-independent work (the absorption prompts' activations and letter probe, the
probing tasks' pooled activations). The first SAE of each (model, hook) is evaluated first and its
actor's cache is copied to the other actors, so that work runs once per hook, not once per actor; then
the remaining SAEs go to whichever actor is free (``ActorPool``). Each actor writes ``bench.json`` into the SAE's
folder (atomically, merged with the metrics an earlier bench left there); the driver logs
``bench/<metric>/<key>`` and the ``bench/bench.json`` artifact into the SAE's MLflow run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows.errors import UserError, check

logger = logging.getLogger(__name__)

BENCH_FILE = "bench.json"


@dataclass(kw_only=True)
class BenchConfig:
    """What to measure, on which text, and how the work spreads over Ray."""

    metrics: list[str] = field(default_factory=lambda: ["core", "absorption", "sparse_probing"])
    """Metric names (see workflows.bench.METRICS)."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-metric options, ``{"absorption": {"max_words": 500}}``."""
    n_tokens: int = 4096
    """Held-out corpus tokens in the context's windows (what `core` evaluates on)."""
    corpus: str | None = None
    """Corpus spec; default: each SAE's dataset_path metadata, else the built-in corpus."""
    context_size: int | None = None
    """Tokens per window; default: each SAE's context_size metadata, else 128."""
    model: str | None = None
    """Model spec for every SAE; default: each SAE's model_name metadata, else the built-in SmolLM2."""
    seed: int = 0
    """Seed of every random choice the metrics make."""
    workers: int = 2
    """Actors, each with its own model copy."""
    cpus_per_worker: float = 0.5
    """Ray CPUs per actor (fractional is fine)."""
    device: str = "cpu"
    """cpu, or cuda (one GPU per actor)."""
    cache_dir: str | None = None
    """Model cache folder."""

    def __post_init__(self) -> None:
        check(self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        check(self.n_tokens >= 1, f"--tokens must be at least 1, got {self.n_tokens}")
        check(self.cpus_per_worker > 0, f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class Target:
    """One SAE to evaluate."""

    sae_dir: str
    """Its folder (any format `sae eval` reads)."""
    run_id: str | None = None
    """The MLflow run to log into."""
    name: str = ""
    """Shown in progress lines."""
    hook: str = ""
    """Hook from its metadata (for grouping)."""
    model: str = ""
    """Model from its metadata (for grouping)."""


# -- the actor ----------------------------------------------------------------------------------------
class BenchWorker:
    """Holds the frozen model(s), held-out windows and per-hook caches; evaluates one SAE per call."""

    def __init__(self, cfg: dict[str, Any]):
        import torch

        self.cfg = BenchConfig(**cfg)
        torch.set_num_threads(max(1, int(self.cfg.cpus_per_worker)))
        self.models: dict[str, Any] = {}
        self.windows: dict[tuple, Any] = {}
        self.shared: dict[tuple, dict[str, Any]] = {}
        self.worker_id = f"{os.uname().nodename}:{os.getpid()}"

    def model(self, spec: str):
        from workflows.models import load_model

        if spec not in self.models:
            self.models[spec] = load_model(spec, device=self.cfg.device, cache_dir=self.cfg.cache_dir)
        return self.models[spec]

    def held_out(self, loaded, spec: str, corpus: str, context: int, skip: int):
        from workflows.evaluate import held_out_windows

        key = (spec, corpus, context, skip)
        if key not in self.windows:
            self.windows[key] = held_out_windows(loaded.tokenizer, corpus=corpus, context_size=context,
                                                 n_tokens=self.cfg.n_tokens, skip_tokens=skip)
        return self.windows[key]

    def warm(self, target: dict[str, Any]) -> None:
        """Load what ``target`` needs (model, windows) ahead of its evaluation; errors surface there."""
        with contextlib.suppress(Exception):
            self.context(Target(**target))

    def export_shared(self, model: str, hook: str) -> dict[str, Any]:
        return self.shared.get((model, hook), {})

    def import_shared(self, model: str, hook: str, shared: dict[str, Any]) -> None:
        self.shared.setdefault((model, hook), {}).update(shared)

    def evaluate(self, target: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        out: dict[str, Any] = {"target": target, "worker": self.worker_id, "results": {}, "errors": {},
                               "seconds": {}, "started": time.time()}
        try:
            ctx = self.context(Target(**target))
        except Exception as exc:  # a broken folder fails its own SAE, not the bench
            out["errors"]["load"] = f"{type(exc).__name__}: {exc}"
            out.update(total_seconds=time.perf_counter() - start, finished=time.time())
            return out
        out.update(model=ctx.loaded.name, hook=ctx.hook)
        for name in self.cfg.metrics:
            out["results"][name], out["seconds"][name], error = run_metric(name, ctx)
            if error:
                out["errors"][name] = error
                del out["results"][name]
        if ctx.sae_dir is not None and out["results"]:
            out["bench_file"] = str(write_bench_file(ctx.sae_dir, out, self.cfg))
        out.update(total_seconds=time.perf_counter() - start, finished=time.time())
        return out

    def context(self, target: Target):
        from workflows.bench import BenchContext
        from workflows.corpus import DEFAULT_CORPUS
        from workflows.evaluate import load_any_sae, training_tokens
        from workflows.models import DEFAULT_MODEL
        from workflows.options import DEFAULT_CONTEXT_SIZE

        sae, meta, ours = load_any_sae(target.sae_dir)
        hook = meta.get("hook_name") or target.hook
        if not hook:
            raise UserError(f"{target.sae_dir}: its metadata names no hook_name")
        spec = self.cfg.model or meta.get("model_name") or DEFAULT_MODEL
        corpus = self.cfg.corpus or (meta.get("dataset_path") if ours else None) or DEFAULT_CORPUS
        context = self.cfg.context_size or meta.get("context_size") or DEFAULT_CONTEXT_SIZE
        skip = training_tokens(target.sae_dir, corpus) if ours else 0
        loaded = self.model(spec)
        sae.eval().to(self.cfg.device)
        return BenchContext(sae=sae, sae_dir=Path(target.sae_dir) if Path(target.sae_dir).is_dir() else None,
                            loaded=loaded, hook=hook, out_hook=meta.get("hook_name_out"),
                            windows=self.held_out(loaded, spec, corpus, int(context), skip), device=self.cfg.device,
                            seed=self.cfg.seed, options=self.cfg.options, metadata=meta,
                            shared=self.shared.setdefault((spec, hook), {}))


def run_metric(name: str, ctx) -> tuple[dict[str, Any], float, str | None]:
    """(result as a dict, seconds, error text or None); a failing metric does not stop the others."""
    from workflows.bench import get_metric

    start = time.perf_counter()
    try:
        result = get_metric(name)(ctx)
    except Exception as exc:
        logger.exception("bench metric %s failed on %s", name, ctx.sae_dir)
        return {}, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
    return {"metrics": result.metrics, "details": result.details}, time.perf_counter() - start, None


def write_bench_file(sae_dir: Path, out: dict[str, Any], cfg: BenchConfig) -> Path:
    """``bench.json`` in the SAE folder, merged with an earlier one (metrics measured again are replaced)."""
    from sae_core.lock import locked
    from sae_core.publish import atomic_write_bytes

    path = sae_dir / BENCH_FILE
    with locked(sae_dir, purpose="writing bench.json", timeout=60.0):  # two benches merge, never clobber
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        results = {**previous.get("results", {}), **out["results"]}
        doc = {"format": "sae-ray-bench/1", "model": out.get("model"), "hook": out.get("hook"),
               "config": {k: v for k, v in cfg.to_dict().items() if k not in ("workers", "cpus_per_worker")},
               "results": results, "seconds": {**previous.get("seconds", {}), **out["seconds"]}}
        atomic_write_bytes(path, json.dumps(doc, indent=1, default=_json_default).encode())
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


# -- the driver ---------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class BenchSummary:
    results: list[dict[str, Any]]
    """One per SAE, in completion order."""
    wall_seconds: float
    workers: int

    def per_worker(self) -> dict[str, dict[str, float]]:
        """SAEs and busy seconds per actor: how the work split."""
        split: dict[str, dict[str, float]] = {}
        for r in self.results:
            row = split.setdefault(r["worker"], {"saes": 0, "seconds": 0.0})
            row["saes"] += 1
            row["seconds"] += r.get("total_seconds", 0.0)
        return split

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["errors"]]


def target_metadata(target: Target) -> Target:
    """Fill hook/model from the SAE's metadata (for grouping) without loading weights."""
    from sae_core.io import read_cfg

    try:
        meta = read_cfg(target.sae_dir).get("metadata") or {}
    except Exception:  # foreign formats: the actor reads them
        meta = {}
    return dataclasses.replace(target, hook=target.hook or meta.get("hook_name", ""),
                               model=target.model or meta.get("model_name", ""),
                               name=target.name or Path(target.sae_dir).name)


def run_bench(targets: list[Target], cfg: BenchConfig, *, mlflow_uri: str | None = None,
              progress: Callable[[str], None] = print) -> BenchSummary:
    """Evaluate every target on an actor pool; log each into its MLflow run as it finishes.

    With several actors, the first SAE of each (model, hook) runs first while the other actors load their
    models; its actor's SAE-independent work (``BenchContext.shared``) is then copied to every actor, so
    no other actor repeats it, and the remaining SAEs go to whichever actor is free."""
    import ray
    from ray.util import ActorPool

    from workflows.raysession import ensure_ray

    if not targets:
        raise UserError("no SAEs to evaluate")
    targets = sorted((target_metadata(t) for t in targets), key=lambda t: (t.model, t.hook, t.name))
    ensure_ray()
    n = min(cfg.workers, len(targets))
    resources = {"num_gpus": 1} if cfg.device.startswith("cuda") else {}
    actor_cls = ray.remote(BenchWorker).options(num_cpus=cfg.cpus_per_worker, **resources)
    actors = [actor_cls.remote(cfg.to_dict()) for _ in range(n)]
    start, results = time.perf_counter(), []

    def finished(out: dict[str, Any]) -> None:
        results.append(out)
        log_to_mlflow(out, mlflow_uri)
        done, elapsed = len(results), time.perf_counter() - start
        eta = elapsed / done * (len(targets) - done)
        status = "failed: " + "; ".join(f"{k}: {v}" for k, v in out["errors"].items()) if out["errors"] else "ok"
        progress(f"[{done}/{len(targets)}] {out['target']['name']} {status} ({out.get('total_seconds', 0):.1f} s "
                 f"on {out['worker']}); elapsed {elapsed:.0f} s, ETA {eta:.0f} s")

    rest = seed_shared(actors, targets, finished) if n > 1 else targets
    for out in ActorPool(actors).map_unordered(lambda a, t: a.evaluate.remote(dataclasses.asdict(t)), rest):
        finished(out)
    return BenchSummary(results=results, wall_seconds=time.perf_counter() - start, workers=n)


def seed_shared(actors: list, targets: list[Target], finished: Callable[[dict[str, Any]], None]) -> list[Target]:
    """Evaluate the first target of each (model, hook) group (one per actor at a time; idle actors load their
    models meanwhile), copy each seed actor's shared cache to every other actor; returns the other targets."""
    import ray

    seeds = list({(t.model, t.hook): t for t in reversed(targets)}.values())[::-1]
    rest = [t for t in targets if t not in seeds]
    for start in range(0, len(seeds), len(actors)):
        batch = seeds[start : start + len(actors)]
        calls = [actors[i].evaluate.remote(dataclasses.asdict(t)) for i, t in enumerate(batch)]
        warm = [actors[i].warm.remote(dataclasses.asdict(batch[0])) for i in range(len(batch), len(actors))]
        outs = ray.get(calls)
        ray.get(warm)
        imports = []
        for i, out in enumerate(outs):
            finished(out)
            if "hook" in out:
                shared = actors[i].export_shared.remote(out["model"], out["hook"])
                imports += [a.import_shared.remote(out["model"], out["hook"], shared) for j, a in enumerate(actors)
                            if j != i]
        ray.get(imports)
    return rest


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``bench/<metric>/<key>`` of every finite number (what MLflow and frontiers see)."""
    return {f"bench/{name}/{k}": float(v) for name, r in results.items() for k, v in r["metrics"].items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def log_to_mlflow(out: dict[str, Any], uri: str | None) -> None:
    run_id = out["target"].get("run_id")
    if not run_id or not out["results"]:
        return
    from workflows.tracking import MlflowTracker, resolve_tracking_uri

    tracker = MlflowTracker(resolve_tracking_uri(uri), run_id)
    tracker.log_metrics(flat_metrics(out["results"]), step=0)
    tracker.set_tags({"bench_metrics": ",".join(sorted(out["results"]))})
    if out.get("bench_file") and Path(out["bench_file"]).is_file():
        tracker.log_artifact(out["bench_file"], "bench")
        return
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # no folder to write into (or on another node)
        path = Path(folder) / BENCH_FILE
        path.write_text(json.dumps({"results": out["results"]}, indent=1, default=_json_default))
        tracker.log_artifact(path, "bench")


# -- finding the SAEs of an experiment ----------------------------------------------------------------
SAE_DIR_TAG = "sae_dir"
"""Tag naming a training run's SAE folder (set by training runs); without it the ``sae/`` artifact is used."""


def experiment_targets(experiment: str, *, uri: str | None = None, parent_run_id: str | None = None,
                       download_dir: str | Path = "runs/bench-artifacts") -> list[Target]:
    """Every FINISHED child run of ``experiment`` (of one parent when ``parent_run_id``) that holds an SAE:
    its folder from the ``sae_dir`` tag when that folder exists here, else its ``sae/`` artifact downloaded
    into ``download_dir/<run id>``."""
    from mlflow.tracking import MlflowClient

    from workflows.tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"no MLflow experiment {experiment!r} at {resolve_tracking_uri(uri)}")
    query = "attributes.status = 'FINISHED'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = client.search_runs([found.experiment_id], query, max_results=10000)
    targets = []
    for run in runs:
        tags = run.data.tags
        if "mlflow.parentRunId" not in tags:
            continue
        folder = tags.get(SAE_DIR_TAG)
        if not (folder and (Path(folder) / "cfg.json").is_file()):
            folder = download_sae(client, run.info.run_id, Path(download_dir))
        if folder:
            targets.append(Target(sae_dir=str(folder), run_id=run.info.run_id, name=run.info.run_name or run.info.run_id,
                                  hook=tags.get("hook", "")))
    return targets


def download_sae(client, run_id: str, download_dir: Path) -> Path | None:
    names = {a.path for a in client.list_artifacts(run_id, "sae")}
    if "sae/cfg.json" not in names:
        logger.warning("MLflow run %s has no sae/ artifact and no %s tag; skipped", run_id, SAE_DIR_TAG)
        return None
    dest = download_dir / run_id
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, "sae", str(dest)))
