"""Circuit tracing on the real SmolLM2 (slow): the causal check of workflows/circuit_check.py on a few prompts,
reporting per prompt the replacement model's top-token agreement and the ablation's predicted vs measured
logit change.

The test here uses a one-layer set (blocks.6, a Tune trial on the shared SmolLM2 store): it asserts what holds
for any set (the graph's logit row is complete against the real logit; the spliced model with errors held
reproduces the real logits on the clean prompt; the local replacement model run forward moves the logit as the
graph's paths predict) and reports the live measurement without asserting it: with one of 30 MLPs covered,
the 29 uncovered ones respond live but are constants in the graph. The check passing on a full set (every
layer covered) is the README's worked example (benchmarks/circuit_check.py on `sae run --recipe
smollm2-transcoders`): training 30 members takes ~15 minutes here, too long for CI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from workflows.circuit_check import as_dicts, check_prompts, markdown_table
from workflows.models import load_model
from workflows.replacement import DecoderRunner
from workflows.transcoder_set import SetSpec, load_set, train_set

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "One, two, three, four,", "She opened the door and"]


@pytest.fixture(scope="module")
def smollm2_set(tmp_path_factory, smollm2_store, local_ray):
    out = tmp_path_factory.mktemp("smollm2-set")
    spec = SetSpec(
        activations=smollm2_store.location.display,
        layers=[6],
        out=str(out / "set"),
        arch="skip_transcoder",
        sae={"d_sae": 1152, "k": 32},
        train={"steps": 150, "batch_size": 512, "lr": 1e-3, "log_every": 25},
        cpus_per_trial=1.0,
        mlflow_uri=f"sqlite:///{out / 'mlflow.db'}",
    )
    train_set(spec)
    return Path(spec.out)


def test_smollm2_causal_check_is_exact_where_the_graph_is_and_reports_the_live_change(smollm2_set, tmp_path):
    loaded = load_model()
    runner, members = DecoderRunner(loaded.model), load_set(smollm2_set)
    rows = check_prompts(runner, loaded.tokenizer, members, PROMPTS, k=5)
    text = markdown_table(rows)
    print(text)
    for row in rows:
        assert row.covered == "1/30" and row.features_active > 0
        assert row.completeness_error < 1e-4 and row.base_error < 1e-3  # logits ~20
        assert row.predicted < 0
        # Features crossing their threshold when upstream ones go are the only gap the linear paths leave.
        assert row.measured_frozen == pytest.approx(row.predicted, rel=0.1, abs=1e-3)
    (tmp_path / "smollm2-circuits.md").write_text(text)
    if os.environ.get("SAE_TEST_ARTIFACTS"):
        Path(os.environ["SAE_TEST_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["SAE_TEST_ARTIFACTS"]) / "smollm2-circuits.json").write_text(
            json.dumps(as_dicts(rows), indent=1)
        )
