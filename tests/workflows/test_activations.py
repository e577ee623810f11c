"""The Ray Data activation pipeline on a real local Ray: store == direct forward, resume, verify, stream, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sae_core.store import ActivationStore
from workflows.activations import CollectConfig, collect, rebatch, stream_activations, stream_hook
from workflows.cli import main
from workflows.corpus import iter_documents, pack_windows
from workflows.errors import UserError
from workflows.hooks import run_with_hooks
from workflows.models import load_model

HOOKS = ["blocks.0.hook_mlp_in", "blocks.1.hook_resid_post"]


def config(model_dir, corpus, out=None, **kw) -> CollectConfig:
    base = dict(model=str(model_dir), hooks=HOOKS, corpus=str(corpus), n_tokens=600, context_size=24,
                batch_size=4, part_windows=5, out=None if out is None else str(out), workers=1)
    return CollectConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, local_ray, tiny_llama_dir, shakespeare):
    out = tmp_path_factory.mktemp("full") / "store"
    result = collect(config(tiny_llama_dir, shakespeare, out, workers=2))  # two actors: batches come back out of order
    assert result.parts_skipped == 0 and result.parts_written > 3
    return out


def direct_rows(model_dir, corpus, cfg: CollectConfig) -> dict[str, np.ndarray]:
    """What one plain forward pass per window gives, keyed by (window_id, position)."""
    loaded = load_model(str(model_dir))
    w = pack_windows(iter_documents(str(corpus)), loaded.tokenizer, context_size=cfg.context_size,
                     n_tokens=cfg.n_tokens)
    with torch.no_grad():
        acts = run_with_hooks(loaded.model, torch.from_numpy(w.token_ids).long(), capture=cfg.hooks).activations
    win, pos = np.nonzero(w.keep)
    out = {"window_id": win, "position": pos, "token_id": w.token_ids[win, pos], "doc_id": w.doc_ids[win, pos]}
    out.update({h: acts[h][torch.from_numpy(w.keep)].numpy() for h in cfg.hooks})
    return out


def test_store_equals_direct_forward_row_for_row(full_store, tiny_llama_dir, shakespeare):
    cfg = config(tiny_llama_dir, shakespeare)
    want = direct_rows(tiny_llama_dir, shakespeare, cfg)
    store = ActivationStore(full_store)
    meta = store.read_meta()
    assert store.n_tokens == len(want["window_id"]) >= cfg.n_tokens
    for key in ("window_id", "position", "token_id", "doc_id"):
        np.testing.assert_array_equal(meta[key], want[key])
    for hook in HOOKS:
        np.testing.assert_allclose(store.read_hook(hook).numpy(), want[hook], atol=1e-5, rtol=1e-4)
    m = store.manifest
    assert m.hooks == {h: {"d": 48} for h in HOOKS} and m.context_size == 24 and m.extra["complete"]
    assert m.bos_token_id == 0 and "bos" in m.excluded and m.model == str(tiny_llama_dir)
    assert [f["path"] for f in m.files] == [f"part-{i:05d}.parquet" for i in range(len(m.files))]
    assert store.verify() == []


def test_resume_after_a_killed_write_gives_the_same_store(full_store, tmp_path, tiny_llama_dir, shakespeare):
    out = tmp_path / "store"
    shutil.copytree(full_store, out)
    manifest = json.loads((out / "manifest.json").read_text())
    last, kept = manifest["files"][-1], manifest["files"][:-2]
    for entry in manifest["files"][-2:]:  # the run died after writing part n-1, before the manifest saw it
        if entry is not last:
            (out / entry["path"]).unlink()
    (out / last["path"]).write_bytes(b"half a part")
    (out / ".part-00009.parquet.x.tmp").write_bytes(b"debris")
    manifest.update(files=kept, n_tokens=sum(f["rows"] for f in kept), complete=False)
    (out / "manifest.json").write_text(json.dumps(manifest))
    mtimes = {f["path"]: (out / f["path"]).stat().st_mtime_ns for f in kept}

    result = collect(config(tiny_llama_dir, shakespeare, out))
    assert (result.parts_written, result.parts_skipped) == (2, len(kept))
    assert {f["path"]: (out / f["path"]).stat().st_mtime_ns for f in kept} == mtimes  # finished parts untouched
    assert not list(out.glob(".*.tmp"))
    resumed, full = ActivationStore(out), ActivationStore(full_store)
    assert resumed.verify() == [] and resumed.n_tokens == full.n_tokens
    assert [f["rows"] for f in resumed.manifest.files] == [f["rows"] for f in full.manifest.files]
    for key, values in full.read_meta().items():
        np.testing.assert_array_equal(resumed.read_meta()[key], values)
    for hook in HOOKS:
        torch.testing.assert_close(resumed.read_hook(hook), full.read_hook(hook), atol=1e-5, rtol=1e-4)


def test_resume_with_other_settings_is_refused(full_store, tmp_path, tiny_llama_dir, shakespeare):
    out = tmp_path / "store"
    shutil.copytree(full_store, out)
    for other in ({"part_windows": 7}, {"n_tokens": 300}):  # fewer tokens than the store holds: no shrinking
        with pytest.raises(UserError, match="resume with the same"):
            collect(config(tiny_llama_dir, shakespeare, out, **other))


def test_a_complete_store_grows_to_more_tokens(full_store, tmp_path, tiny_llama_dir, shakespeare):
    """--tokens 900 on the complete 600-token store: finished parts are kept, its last part (fewer windows
    than a part) is rewritten, the rest appended; the rows are those of a direct forward of 900 tokens."""
    out = tmp_path / "store"
    shutil.copytree(full_store, out)
    before = ActivationStore(out).manifest
    assert before.extra["n_windows"] % 5  # the last part is short, so it must be rewritten
    cfg = config(tiny_llama_dir, shakespeare, out, n_tokens=900)
    result = collect(cfg)
    assert result.parts_skipped == len(before.files) - 1 and result.parts_written >= 2
    store = ActivationStore(out)
    want = direct_rows(tiny_llama_dir, shakespeare, cfg)
    np.testing.assert_array_equal(store.read_meta()["window_id"], want["window_id"])
    np.testing.assert_allclose(store.read_hook(HOOKS[1]).numpy(), want[HOOKS[1]], atol=1e-5, rtol=1e-4)
    assert store.verify() == [] and store.manifest.extra["collect"]["n_tokens"] == 900


def test_verify_names_the_corrupted_file(full_store, tmp_path, capsys):
    out = tmp_path / "store"
    shutil.copytree(full_store, out)
    assert main(["store", "verify", str(out)]) == 0
    victim = out / "part-00001.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["store", "verify", str(out)]) == 1
    assert "part-00001.parquet" in capsys.readouterr().out
    (out / "part-00002.parquet").unlink()
    assert [p.path for p in ActivationStore(out).verify()] == ["part-00001.parquet", "part-00002.parquet"]


def test_stream_yields_the_store_rows_without_disk(full_store, tiny_llama_dir, shakespeare):
    cfg = config(tiny_llama_dir, shakespeare)
    batches = list(stream_activations(cfg))
    rows = {k: torch.cat([b[k] for b in batches]).numpy() for k in ["window_id", "position", *HOOKS]}
    order = np.lexsort((rows["position"], rows["window_id"]))
    store = ActivationStore(full_store)
    np.testing.assert_array_equal(rows["window_id"][order], store.read_meta()["window_id"])
    np.testing.assert_allclose(rows[HOOKS[1]][order], store.read_hook(HOOKS[1]).numpy(), atol=1e-5, rtol=1e-4)
    fixed = list(rebatch(iter(batches), HOOKS[1], batch_size=128))
    assert len(fixed) == store.n_tokens // 128 and all(b.shape == (128, 48) for b in fixed)
    torch.testing.assert_close(torch.cat(fixed), torch.cat([b[HOOKS[1]] for b in batches])[: 128 * len(fixed)])
    with pytest.raises(UserError, match="not among"):
        next(stream_hook(cfg, "blocks.0.hook_attn_out", 8))


def test_cli_collect_gpt2_float16_and_hooks(tmp_path, capsys, local_ray, tiny_gpt2_dir, shakespeare):
    out = tmp_path / "store"
    args = ["collect", "--model", str(tiny_gpt2_dir), "--hook", "blocks.1.hook_attn_out", "--corpus", str(shakespeare),
            "--tokens", "300", "--context-size", "32", "--out", str(out), "--dtype", "float16", "--workers", "1"]
    assert main(args) == 0
    store = ActivationStore(out)
    assert store.manifest.dtype == "float16" and store.n_tokens >= 300 and store.d("blocks.1.hook_attn_out") == 32
    assert pq.read_schema(out / "part-00000.parquet").field("blocks.1.hook_attn_out").type.value_type == "halffloat"
    assert main(args) == 0 and "already done" in capsys.readouterr().out
    assert main(["hooks", "--model", str(tiny_gpt2_dir)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 8 and listed[0] == "blocks.0.hook_resid_post\t32"


@pytest.mark.parametrize("argv, message", [
    (["--hook", "blocks.7.hook_resid_post"], "model has blocks 0..2"),
    (["--hook", "blocks.0.hook_resid_post", "--corpus", "/nonexistent/*.txt"], "matches no file"),
    (["--hook", "blocks.0.hook_resid_post", "--tokens", "0"], "at least 1"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, tiny_llama_dir, argv, message):
    base = ["collect", "--model", str(tiny_llama_dir), "--tokens", "10", "--out", str(tmp_path / "s")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_real_smollm2_default_collects(smollm2_store):
    # The shared store: `sae collect` with the default model and corpus (tests/workflows/conftest.py).
    store = smollm2_store
    assert store.verify() == [] and store.n_tokens >= 16_000 and store.d("blocks.6.hook_resid_post") == 576
    assert store.d("blocks.6.hook_mlp_in") == store.d("blocks.6.hook_mlp_out") == 576
    assert store.manifest.model == "builtin:smollm2-135m-instruct" and store.manifest.corpus == "builtin:stdlib"
    acts = store.read_hook("blocks.6.hook_resid_post")
    assert acts.std() > 0.1 and torch.isfinite(acts).all()


def test_collect_refuses_to_finish_a_store_with_a_part_that_never_arrived(tmp_path):
    from sae_core.store import Manifest, StoreWriter, make_table
    from workflows.activations import _check_every_part_arrived
    from workflows.errors import UserError

    writer = StoreWriter(tmp_path / "s", Manifest(model="m", hooks={"h": {"d": 2}}, context_size=4,
                                                extra={"complete": False}))
    for part in (0, 2):  # part 1 lost between the actor pool and the driver
        rows = np.arange(4 * part, 4 * part + 4)
        meta = {"token_id": rows, "window_id": rows // 4, "position": rows % 4, "doc_id": rows // 4}
        writer.write_part(part, make_table(meta, {"h": np.zeros((4, 2), np.float32)}, "float32"))
    with pytest.raises(UserError, match=r"parts \[1\] never arrived"):
        _check_every_part_arrived(writer)
    writer.close()
    assert not ActivationStore(tmp_path / "s").complete
