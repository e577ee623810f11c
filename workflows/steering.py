"""Steering with an SAE feature: greedy generation with the feature's decoder direction added at a hook.

Two modes, applied at every position (prompt and generated tokens) on each forward pass:

- add: ``x + scale * d / ||d||``, with ``d`` the feature's decoder row (``scale`` is in residual units).
- clamp: the feature's activation ``a = sae.encode(x)[f]`` is set to ``value`` by adding
  ``(value - a) * d``. The SAE's reconstruction error stays in ``x`` (we edit, not replace), as
  SAELens's steering does; a TopK SAE reports ``a = 0`` where the feature is not among the top k.

Generation is a plain greedy loop without a KV cache (one full forward per new token): simplest to
keep exact for short continuations, and ``scale=0`` reproduces the unsteered tokens bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from sae_core.architectures.base import SparseAutoencoder
from workflows.corpus import special_ids
from workflows.errors import UserError
from workflows.hooks import Replacement, d_model, decoder_layers, parse_hook, run_with_hooks
from workflows.models import LoadedModel


class SteerResult(NamedTuple):
    steered_text: str
    """The steered continuation (new tokens only)."""
    baseline_text: str
    """The unsteered continuation."""
    steered_ids: list[int]
    baseline_ids: list[int]
    prompt_ids: list[int]
    """The prompt as fed to the model (BOS first, as in the windows the SAE was trained on)."""


def steering_fn(sae: SparseAutoencoder, feature: int, scale: float, clamp: float | None) -> Replacement:
    """The hook replacement: add ``scale`` times the unit decoder row, or clamp the activation."""
    row_D = sae.W_dec.detach()[feature].float()

    def add(x_BTD: Tensor) -> Tensor:
        return x_BTD + (scale * row_D / row_D.norm()).to(x_BTD.dtype)

    def clamp_to(x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        act_BT = sae.encode(x_BTD.reshape(B * T, D).float())[:, feature].reshape(B, T)
        return x_BTD + ((clamp - act_BT)[..., None] * row_D).to(x_BTD.dtype)

    return add if clamp is None else clamp_to


@torch.no_grad()
def greedy(model: Any, prompt_ids: list[int], max_new_tokens: int, *, replace: dict[str, Replacement] | None,
           stop_ids: set[int]) -> list[int]:
    """Greedy continuation (new ids only); stops early at a stop id, which is kept."""
    ids = list(prompt_ids)
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        logits = run_with_hooks(model, torch.tensor([ids], device=device), replace=replace, stop_at_last=False).logits
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] in stop_ids:
            break
    return ids[len(prompt_ids):]


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    bos = special_ids(tokenizer)[0]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return [bos, *ids]


def check(model: Any, sae: SparseAutoencoder, hook: str, feature: int, max_new_tokens: int) -> None:
    parse_hook(hook, len(decoder_layers(model)))
    if sae.cfg.d_in != d_model(model):
        raise UserError(f"the SAE reads width {sae.cfg.d_in}, but {hook} has width {d_model(model)}")
    if not 0 <= feature < sae.cfg.d_sae:
        raise UserError(f"feature {feature} is out of range: the SAE has features 0..{sae.cfg.d_sae - 1}")
    if max_new_tokens < 1:
        raise UserError(f"max new tokens must be at least 1, got {max_new_tokens}")


def steer(model: LoadedModel, sae: SparseAutoencoder, hook: str, feature: int, scale: float, prompt: str,
          max_new_tokens: int = 20, clamp: float | None = None) -> SteerResult:
    """Greedy continuations of ``prompt`` with and without the feature steered at ``hook``.

    ``clamp`` (when given) replaces additive steering: ``scale`` is then not used.
    """
    check(model.model, sae, hook, feature, max_new_tokens)
    tokenizer = model.tokenizer
    ids = prompt_ids(tokenizer, prompt)
    stop = {tokenizer.eos_token_id} - {None}
    baseline = greedy(model.model, ids, max_new_tokens, replace=None, stop_ids=stop)
    steered = greedy(model.model, ids, max_new_tokens, replace={hook: steering_fn(sae, feature, scale, clamp)},
                     stop_ids=stop)
    return SteerResult(steered_text=tokenizer.decode(steered), baseline_text=tokenizer.decode(baseline),
                       steered_ids=steered, baseline_ids=baseline, prompt_ids=ids)
