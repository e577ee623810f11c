"""Writes the notebooks from the cell sources below (outputs empty). Run: python notebooks/_build.py"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SETTINGS = '''import os
from pathlib import Path

# Full-size by default; CI runs every notebook top to bottom with SAE_NB_TINY=1.
TINY = os.environ.get("SAE_NB_TINY") == "1"
WORK = Path(os.environ.get("SAE_NB_WORKDIR", "runs/notebooks")).resolve()
WORK.mkdir(parents=True, exist_ok=True)
MLFLOW_URI = f"sqlite:///{WORK / 'mlflow.db'}"'''

QUICKSTART = [
    new_markdown_cell("# 01 — Quickstart: an SAE on SmolLM2, and a first look at its features\n\n"
                      "Runs the default recipe (`sae run --recipe smollm2-topk`): activations from the embedded "
                      "SmolLM2-135M on the embedded corpus, a TopK SAE on Ray Train, CE loss recovered, "
                      "dashboards. With `SAE_NB_TINY=1` every size shrinks so it runs in about a minute."),
    new_code_cell(SETTINGS),
    new_code_cell('''from workflows.recipes import get_recipe

overrides = {}
if TINY:
    overrides = {"hook": "blocks.3.hook_resid_post", "tokens": 6000, "sae": {"d_sae": 1152, "k": 16},
                 "train": {"steps": 60, "batch_size": 512, "lr": 2e-3, "log_every": 20},
                 "cpus_per_worker": 0.5, "eval_tokens": 512, "dashboard_features": 8, "dashboard_tokens": 2000}
recipe = get_recipe("smollm2-topk", overrides)
recipe'''),
    new_code_cell('''from workflows.pipeline import run_pipeline, summary

result = run_pipeline(recipe, out=WORK / "quickstart", mlflow_uri=MLFLOW_URI, experiment="notebook-quickstart")
print(summary(result))'''),
    new_markdown_cell("## Sparsity and reconstruction\n\nThe evaluation wrote a histogram of log10 firing "
                      "frequency; dead latents sit at -10."),
    new_code_cell('''from IPython.display import Image, display

display(Image(filename=str(WORK / "quickstart" / "eval" / "feature_density.png")))
assert 0 < result.metrics["l0"] and result.metrics["fvu"] < 1.5'''),
    new_markdown_cell("## The most active features\n\n`features.json` beside the dashboard holds what the "
                      "pages show: density, max activation, top tokens, promoted logits."),
    new_code_cell('''import json

import pandas as pd

features = json.loads((result.dashboard / "features.json").read_text())["features"]
table = pd.DataFrame([{k: f[k] for k in ("feature", "density", "max", "summary")} |
                      {"promotes": " ".join(f["promoted"][:5])} for f in features])
table'''),
    new_code_cell('''print("open in a browser:", result.dashboard / "index.html")
assert len(table) > 0'''),
]

PARETO = [
    new_markdown_cell("# 02 — Finding the L0 for your data: a sweep over L0, its frontiers, the correct-L0 pick\n\n"
                      "L0 (latents active per token) is the setting that matters most. This notebook does what "
                      "`sae sweep --grid target_l0=...` and `sae frontier` do, in Python: a small Ray Tune sweep over "
                      "`target_l0` on a synthetic store with planted features (so the true L0 is known), the "
                      "(L0, FVU) frontier rebuilt from the MLflow runs alone, a frontier on another metric pair, "
                      "and the L0 the correct-L0 diagnostic (Chanin & Garriga-Alonso 2025) picks from the "
                      "decoders. On your data, replace the store with your activations."),
    new_code_cell(SETTINGS),
    new_code_cell('''from sae_core.synthetic import SyntheticConfig, SyntheticData, write_synthetic_store

planted = SyntheticConfig(d=64, n_features=256, mean_active=6)
store = write_synthetic_store(WORK / "pareto-store", planted, 20_000 if TINY else 200_000)
true_l0 = float(SyntheticData(planted).prob_N.sum())  # the mean number of planted features active per token
print(f"true L0 of the planted data: {true_l0:.1f}")'''),
    new_markdown_cell("## A sweep over L0\n\n`target_l0` works for every architecture (`k` for the TopK "
                      "family, a target loss for JumpReLU, a coefficient controller for ReLU and Gated). The "
                      "trials share the store and step count, so the sweep packs them into as many Tune trials "
                      "as run at once, each training its SAEs on one read of the store; every SAE still gets its "
                      "own MLflow run."),
    new_code_cell('''from workflows.sweep import SweepSpec, run_sweep

spec = SweepSpec(activations=str(store), hook="synthetic", archs=["batchtopk"],
                 grid={"target_l0": [2, 4, 6, 9, 14, 20], "d_sae": [256] if TINY else [256, 512]},
                 steps=60 if TINY else 1500, batch_size=256, lr=5e-3, experiment="notebook-pareto",
                 mlflow_uri=MLFLOW_URI, out=str(WORK / "sweeps"), cpus_per_trial=1.0)
sweep = run_sweep(spec)
print(f"{len(sweep.finished)} of {sweep.trials} SAEs finished in {sweep.tune_trials} Tune trials, "
      f"{sweep.failed} failed; parent run {sweep.parent_run_id}")'''),
    new_code_cell('''import mlflow
import pandas as pd

mlflow.set_tracking_uri(MLFLOW_URI)
runs = mlflow.search_runs(experiment_names=["notebook-pareto"],
                          filter_string="tags.mlflow.parentRunId != ''")
runs = runs[runs["status"] == "FINISHED"]
points = runs[["run_id", "params.sae.k", "params.sae.d_sae", "metrics.final/l0", "metrics.final/fvu",
               "metrics.final/decoder_cosine"]]
points'''),
    new_code_cell('''from workflows.pareto import pareto_front

front = sorted(pareto_front(list(zip(points["metrics.final/l0"], points["metrics.final/fvu"]))))
frontier = points.iloc[front].sort_values("metrics.final/l0")
frontier'''),
    new_code_cell('''import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 4))
ax.scatter(points["metrics.final/l0"], points["metrics.final/fvu"], label="trials", alpha=0.6)
ax.step(frontier["metrics.final/l0"], frontier["metrics.final/fvu"], where="post", color="C3", label="frontier")
ax.set_xlabel("L0 (active latents per token)"); ax.set_ylabel("FVU"); ax.legend()
plt.show()
tagged = set(runs[runs["tags.pareto"] == "true"]["run_id"])
assert tagged == set(frontier["run_id"]), "MLflow's pareto tags disagree with the frontier rebuilt here"'''),
    new_markdown_cell("## A frontier on any two metrics\n\n`sae frontier --x dead_fraction --y fvu` (or "
                      "`--y ce_loss_recovered:max` when the sweep measured it with `--model`): any two `final/*` "
                      "metrics, each minimised or maximised."),
    new_code_cell('''from workflows.frontier import collect_trials, format_table, frontier as pareto, kind_for, parse_axis

trials = collect_trials("notebook-pareto", uri=MLFLOW_URI, parent_run_id=sweep.parent_run_id)
kind = kind_for(parse_axis("dead_fraction"), parse_axis("fvu"))
print(format_table(trials, kind))
assert pareto(trials, kind)[1], "no frontier on (dead_fraction, fvu)"'''),
    new_markdown_cell("## The L0 the decoders point to\n\nToo low an L0 makes latents merge correlated "
                      "features, too high an L0 makes them mix; both show as decoder rows that are less "
                      "orthogonal. The diagnostic logs `final/decoder_cosine` (mean |cosine| between decoder "
                      "rows) for every SAE and picks, per architecture and width, the L0 where it is smallest, "
                      "with a confidence (0 when the minimum sits at an end of the sweep: extend it). It needs "
                      "well-trained SAEs: the tiny CI run's pick means little; the full run's lands near the "
                      "true L0 printed above."),
    new_code_cell('''from workflows.frontier_report import format_picks, l0_picks

fig, ax = plt.subplots(figsize=(6, 4))
for d_sae, group in points.groupby("params.sae.d_sae"):
    group = group.sort_values("metrics.final/l0")
    ax.plot(group["metrics.final/l0"], group["metrics.final/decoder_cosine"], "o-", label=f"d_sae {d_sae}")
ax.axvline(true_l0, color="grey", ls="--", label="true L0")
ax.set_xscale("log"); ax.set_xlabel("L0"); ax.set_ylabel("decoder cosine (lower: less mixing)"); ax.legend()
plt.show()
picks = l0_picks(trials)
print(format_picks(picks))
assert picks and all(min(spec.grid["target_l0"]) <= p.pick.l0 <= max(spec.grid["target_l0"]) for p in picks)'''),
]

STEERING = [
    new_markdown_cell("# 03 — Features and steering\n\nReuse the quickstart's SAE (notebook 01 in the same "
                      "work folder) or train a small one on SmolLM2, look at one feature's top contexts, then "
                      "steer generation with it."),
    new_code_cell(SETTINGS),
    new_code_cell('''import json

from workflows.pipeline import run_pipeline
from workflows.recipes import Recipe, get_recipe

quick = WORK / "quickstart"
if (quick / "eval" / "eval.json").is_file() and (quick / "sae" / "cfg.json").is_file():
    # Notebook 01 ran in this work folder: its SAE, recipe and evaluation are all there.
    recipe = Recipe(**json.loads((quick / "recipe.json").read_text()))
    sae_dir = quick / "sae"
    metrics = json.loads((quick / "eval" / "eval.json").read_text())
    print("reusing the quickstart's SAE in", sae_dir)
else:
    overrides = {"dashboard_features": 0}
    if TINY:
        overrides |= {"hook": "blocks.3.hook_resid_post", "tokens": 6000, "sae": {"d_sae": 1152, "k": 16},
                      "train": {"steps": 60, "batch_size": 512, "lr": 2e-3, "log_every": 20},
                      "cpus_per_worker": 0.5, "eval_tokens": 512}
    recipe = get_recipe("smollm2-topk", overrides)
    result = run_pipeline(recipe, out=WORK / "steering", mlflow_uri=MLFLOW_URI, experiment="notebook-steering")
    sae_dir, metrics = result.sae_dir, result.metrics
metrics["ce_loss_recovered"]'''),
    new_code_cell('''from sae_core.io import load_sae
from workflows.models import load_model

model = load_model(recipe.model)
sae = load_sae(sae_dir)
sparsity = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
    str(sae_dir / "sparsity.safetensors"))["sparsity"]
feature = int(sparsity.argmax())  # the most frequent feature on the held-out text
feature, float(sparsity[feature])'''),
    new_markdown_cell("## Where does the feature fire?"),
    new_code_cell('''import torch

from workflows.corpus import iter_documents, pack_windows
from workflows.hooks import run_with_hooks

windows = pack_windows(iter_documents(recipe.corpus), model.tokenizer, context_size=64, n_tokens=2000)
ids = torch.from_numpy(windows.token_ids.astype("int64"))
with torch.no_grad():
    acts = run_with_hooks(model.model, ids, capture=[recipe.hook]).activations[recipe.hook]
    f = sae.encode(acts.reshape(-1, acts.shape[-1]))[:, feature].reshape(ids.shape)
f[~torch.from_numpy(windows.keep)] = 0
for flat in f.flatten().topk(5).indices.tolist():
    w, t = divmod(flat, ids.shape[1])
    left = model.tokenizer.decode(ids[w, max(t - 8, 0):t].tolist())
    print(f"{float(f[w, t]):7.2f}  ...{left}[[{model.tokenizer.decode([int(ids[w, t])])}]]")'''),
    new_markdown_cell("## Steering\n\nAdd the feature's unit decoder direction, scaled, at the hook at every "
                      "position; scale 0 reproduces the unsteered text exactly."),
    new_code_cell('''from workflows.steering import steer

prompt = "The history of the city begins"
n_new = 8 if TINY else 30
for scale in (0.0, 20.0, 60.0):
    out = steer(model, sae, recipe.hook, feature, scale, prompt, max_new_tokens=n_new)
    print(f"scale {scale:5.1f}: {out.steered_text!r}")
print("unsteered :", repr(out.baseline_text))
assert steer(model, sae, recipe.hook, feature, 0.0, prompt, max_new_tokens=n_new).steered_ids == out.baseline_ids'''),
]


def main() -> None:
    kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    for name, cells in (("01_quickstart", QUICKSTART), ("02_pareto", PARETO), ("03_features_and_steering", STEERING)):
        nb = new_notebook(cells=cells, metadata=kernel)
        for i, cell in enumerate(nb.cells):
            cell.id = f"{name[:2]}-{i:02d}"  # stable ids: rebuilding changes only the cells that changed
        nbformat.validate(nb)
        nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
