"""A transcoder set in the layout the `circuit-tracer` package loads (``model_kind: transcoder_set``).

The folder holds ``config.yaml`` (model name, model kind, the hooks features read and write in that
package's naming: ``mlp.hook_in`` is the MLP input after the pre-MLP norm, our ``hook_mlp_in``;
``mlp.hook_out`` the MLP output, our ``hook_mlp_out``; and the per-layer files in layer order) and one
``layer_{i}.safetensors`` per layer with ``W_enc`` [d_transcoder, d_model] (the transpose of ours),
``W_dec`` [d_transcoder, d_model], ``b_enc``, ``b_dec``, ``W_skip`` [d_model, d_model] for skip
transcoders (applied as ``x @ W_skip.T``, as ours) and ``activation_function.threshold`` [d_transcoder]
for JumpReLU-style encoders (our TopK and BatchTopK transcoders run as JumpReLU with their learned
threshold in eval mode; see sae_core/architectures/transcoder.py), none for ReLU. Scaling factors are
already folded into the saved weights, so the files read raw activations. That package needs every
layer from 0 up to the last: a set starting later is refused. The project never imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_core.publish import atomic_write_bytes
from workflows.errors import UserError
from workflows.transcoder_set import load_set, read_set

# Model specs of ours that have another name on the Hugging Face hub (where circuit-tracer loads models).
HUB_NAMES = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def layer_tensors(tc) -> dict[str, torch.Tensor]:
    tensors = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
    if tc.skip:
        tensors["W_skip"] = tc.W_skip
    if tc.cfg.activation == "jumprelu":
        tensors["activation_function.threshold"] = tc.log_threshold.exp()
    elif tc.cfg.activation in ("topk", "batchtopk"):
        tensors["activation_function.threshold"] = tc.threshold
    return {k: v.detach().float().contiguous().clone() for k, v in tensors.items()}


def export_circuit_tracer(set_dir: str | Path, out: str | Path) -> Path:
    """Write ``set_dir`` (a transcoder set) as a circuit-tracer transcoder set in ``out``; returns config.yaml."""
    import yaml

    manifest, out = read_set(set_dir), Path(out)
    layers = list(manifest["layers"])
    if layers != list(range(len(layers))):
        raise UserError(
            f"circuit-tracer needs a transcoder for every layer from 0 up; this set covers {layers}: "
            "train the missing layers (--set layers=0-N)"
        )
    members = load_set(set_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer in layers:
        path = out / f"layer_{layer}.safetensors"
        save_file(layer_tensors(members[layer]), str(path))
        paths.append(str(path.resolve()))
    first = members[layers[0]]
    config = {
        "model_name": HUB_NAMES.get(manifest["model"], manifest["model"]),
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": f"sae-ray:{Path(set_dir).resolve().name}",
        "transcoders": paths,
    }
    if first.cfg.activation == "relu":
        config["activation"] = "relu"
    atomic_write_bytes(out / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    return out / "config.yaml"
