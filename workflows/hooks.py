"""Named hook points on Hugging Face decoder-only models: capture, replace, and stop early.

Names follow TransformerLens / SAELens so SAEs trained here line up with theirs:

- ``blocks.{L}.hook_resid_post``: the residual stream after block L (the block's output).
- ``blocks.{L}.hook_attn_out``: what attention adds to the residual stream in block L
  (after Gemma-2/3's post-attention norm, which sits on that branch).
- ``blocks.{L}.hook_mlp_in``: the input of the MLP, i.e. after the pre-MLP norm (read by SAEs mapping MLP in to MLP out).
- ``blocks.{L}.hook_mlp_out``: what the MLP adds to the residual stream (after Gemma's post-FFN norm).

Supported layouts: Llama / Qwen / Mistral / Gemma (``model.layers``), GPT-2 (``transformer.h``),
GPT-NeoX (``gpt_neox.layers``). Every hook has width ``config.hidden_size``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from workflows.errors import UserError

KINDS = ("resid_post", "attn_out", "mlp_in", "mlp_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")
# Where each family keeps its decoder blocks (first match wins); base models and LM-head wrappers.
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "layers", "h")
_ATTN_NAMES = ("self_attn", "attn", "attention")

Replacement = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HookPoint:
    """A parsed hook name."""

    name: str
    layer: int
    kind: str


class HookRun(NamedTuple):
    """Result of :func:`run_with_hooks`."""

    activations: dict[str, torch.Tensor]
    """Captured hook name -> [batch, seq, d] (the value before any replacement at that hook)."""
    logits: torch.Tensor | None
    """[batch, seq, vocab], or None when the forward pass was stopped at the deepest hook."""


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass once everything asked for is captured."""


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks; a UserError names the layouts supported."""
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UserError(
        f"{type(model).__name__} has no decoder-block list at any of {_LAYER_PATHS}; "
        "supported: Llama/Qwen/Mistral/Gemma, GPT-2, GPT-NeoX layouts"
    )


def d_model(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def list_hooks(model: nn.Module) -> list[str]:
    """Every hook name the model offers, block by block."""
    return [f"blocks.{i}.hook_{kind}" for i in range(len(decoder_layers(model))) for kind in KINDS]


def parse_hook(name: str, n_layers: int) -> HookPoint:
    match = _HOOK_RE.match(name)
    if not match or match.group(2) not in KINDS:
        raise UserError(f"hook {name!r} is not of the form blocks.<L>.hook_<{'|'.join(KINDS)}> (see `sae hooks`)")
    layer = int(match.group(1))
    if layer >= n_layers:
        raise UserError(f"hook {name!r} names block {layer}, but the model has blocks 0..{n_layers - 1}")
    return HookPoint(name=name, layer=layer, kind=match.group(2))


def _submodule(block: nn.Module, names: Iterable[str], what: str) -> nn.Module:
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(f"{type(block).__name__} has no {what} submodule (looked for {list(names)})")


def hook_target(block: nn.Module, kind: str) -> tuple[nn.Module, bool]:
    """(module, is_pre_hook) whose output (or first input, for a pre-hook) is the hook's value."""
    if kind == "resid_post":
        return block, False
    if kind == "mlp_in":
        return _submodule(block, ["mlp"], "MLP"), True
    if kind == "attn_out":
        # Gemma-2/3 norm the attention output before adding it; there post_attention_layernorm is
        # on the branch, while in Llama it is the pre-MLP norm (Gemma names that pre_feedforward_layernorm).
        if hasattr(block, "pre_feedforward_layernorm"):
            return block.post_attention_layernorm, False
        return _submodule(block, _ATTN_NAMES, "attention"), False
    if kind == "mlp_out":
        if hasattr(block, "post_feedforward_layernorm"):
            return block.post_feedforward_layernorm, False
        return _submodule(block, ["mlp"], "MLP"), False
    raise UserError(f"unknown hook kind {kind!r}; expected one of {KINDS}")


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _swap_first(value: Any, new: torch.Tensor) -> Any:
    return (new, *value[1:]) if isinstance(value, tuple) else new


def _make_hook(name: str, pre: bool, store: dict[str, torch.Tensor] | None, fn: Replacement | None):
    if pre:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            value = args[0] if args else kwargs["hidden_states"]
            if store is not None:
                store[name] = value
            if fn is None:
                return None
            if args:
                return (fn(value), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(value)}
        return pre_hook

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if store is not None:
            store[name] = _first(output)
        return None if fn is None else _swap_first(output, fn(_first(output)))
    return hook


def _stop_hook(module: nn.Module, args: tuple, output: Any) -> None:
    raise _StopForward


def run_with_hooks(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    capture: Iterable[str] = (),
    replace: dict[str, Replacement] | None = None,
    stop_at_last: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> HookRun:
    """Run ``model`` on ``input_ids`` [batch, seq], capturing and/or replacing named hook values.

    ``replace`` maps a hook name to a function of its value [batch, seq, d] returning the new value
    (steering, SAE splicing). With ``stop_at_last`` and something to capture, the forward pass ends
    after the deepest hooked block and no logits are returned; otherwise logits come back.
    Gradients follow the caller's mode (wrap in ``torch.inference_mode()`` for collection).
    """
    capture, replace = list(capture), dict(replace or {})
    layers = decoder_layers(model)
    points = {name: parse_hook(name, len(layers)) for name in [*capture, *replace]}
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        # Capture hooks are registered first so a hook both captured and replaced records the original.
        plans = [(n, captured, None) for n in capture] + [(n, None, fn) for n, fn in replace.items()]
        for name, store, fn in plans:
            module, pre = hook_target(layers[points[name].layer], points[name].kind)
            hook = _make_hook(name, pre, store, fn)
            if pre:
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook))
        stop = stop_at_last and bool(capture)
        if stop:
            deepest = max(p.layer for p in points.values())
            handles.append(layers[deepest].register_forward_hook(_stop_hook))
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            return HookRun(activations=captured, logits=None)
        return HookRun(activations=captured, logits=out.logits)
    finally:
        for handle in handles:
            handle.remove()
