"""Stores on object storage: a real S3 server (SeaweedFS on loopback) written by `sae synth` and
`collect`, verified, resumed, and trained on in process exactly as a local copy is."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
import torch

from sae_core.io import load_sae
from sae_core.store import ActivationStore, StoreError, read_manifest, write_manifest
from sae_core.trainer import TrainConfig
from workflows.activations import CollectConfig, collect
from workflows.cli import main
from workflows.training import TrainJob, train_local

SYNTH = ["--d", "16", "--n-features", "48", "--mean-active", "3", "--tokens", "6000", "--dtype", "bfloat16"]


def train(activations: str, out) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(steps=20, batch_size=256, lr=3e-3, log_every=10)
    train_local(TrainJob(activations=activations, hook="synthetic", arch="topk", sae={"d_sae": 64, "k": 3},
                         train=cfg, out=str(out)))
    return load_sae(out).state_dict()


def test_synth_verify_and_train_on_s3_match_a_local_store(s3_server, tmp_path, capsys):
    uri = s3_server("synth")
    assert main(["synth", "--out", uri, *SYNTH]) == 0
    assert main(["synth", "--out", str(tmp_path / "local"), *SYNTH]) == 0
    assert main(["store", "verify", uri]) == 0
    assert "OK " in capsys.readouterr().out
    remote, local = ActivationStore(uri), ActivationStore(tmp_path / "local")
    assert remote.manifest.dtype == "bfloat16" and remote.manifest.files == local.manifest.files
    torch.testing.assert_close(remote.read_hook("synthetic", 1000, 4000), local.read_hook("synthetic", 1000, 4000))
    from_s3, from_disk = train(uri, tmp_path / "sae-s3"), train(str(tmp_path / "local"), tmp_path / "sae-local")
    for name, value in from_disk.items():
        torch.testing.assert_close(from_s3[name], value, rtol=0, atol=0)
    assert json.loads((tmp_path / "sae-s3" / "metrics.json").read_text())["fvu"] < 1

    # A damaged object is named by verify, as a damaged local file is.
    fs, paths = remote.part_paths()
    with fs.open_input_stream(paths[0]) as fh:
        data = bytearray(fh.read())
    data[len(data) // 2] ^= 0xFF
    with fs.open_output_stream(paths[0]) as fh:
        fh.write(bytes(data))
    assert main(["store", "verify", uri]) == 1
    assert "part-00000.parquet: sha256" in capsys.readouterr().out
    # Training checks each object's size (its file info; no data read) and with --verify its sha256.
    ActivationStore(uri).check_ready()
    assert main(["train", "--activations", uri, "--hook", "synthetic", "--d-sae", "64", "--k", "3", "--steps", "5",
                 "--batch-size", "64", "--verify", "--out", str(tmp_path / "verified")]) == 2
    assert "part-00000.parquet: sha256" in capsys.readouterr().err
    with fs.open_output_stream(paths[0]) as fh:
        fh.write(bytes(data[:-1]))
    with pytest.raises(StoreError, match=f"part-00000.parquet is {len(data) - 1} bytes, the manifest says {len(data)}"):
        ActivationStore(uri).check_ready()


def test_collect_to_s3_resumes_only_the_missing_parts(s3_server, local_ray, tiny_llama_dir, shakespeare):
    uri = s3_server("collect")
    cfg = CollectConfig(model=str(tiny_llama_dir), hooks=["blocks.1.hook_resid_post"], corpus=str(shakespeare),
                        n_tokens=400, context_size=24, batch_size=4, part_windows=5, out=uri, dtype="bfloat16")
    first = collect(cfg)
    assert first.parts_written >= 3 and first.parts_skipped == 0
    whole = ActivationStore(uri).read_hook("blocks.1.hook_resid_post")
    # A run killed after its first parts: the manifest lists only those, the rest are not there.
    manifest = read_manifest(uri)
    fs, paths = ActivationStore(uri).part_paths()
    for path in paths[2:]:
        fs.delete_file(path)
    manifest.files, manifest.extra["complete"] = manifest.files[:2], False
    manifest.n_tokens = sum(f["rows"] for f in manifest.files)
    write_manifest(uri, manifest)
    again = collect(cfg)
    assert (again.parts_written, again.parts_skipped) == (first.parts_written - 2, 2)
    store = ActivationStore(uri)
    assert store.verify() == [] and store.manifest.extra["complete"] is True
    torch.testing.assert_close(store.read_hook("blocks.1.hook_resid_post"), whole)
    assert fs.get_file_info(paths[-1]).type == pafs.FileType.File
