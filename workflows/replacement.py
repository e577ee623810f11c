"""The local replacement model of a prompt, for Llama-family decoders (Llama, Mistral, Qwen2; SmolLM2 is one).

:class:`DecoderRunner` re-implements the decoder's forward from the Hugging Face modules' weights, so every
quantity circuit tracing freezes is in plain sight: the RMSNorm denominators ``rsqrt(mean(x^2) + eps)``,
the attention patterns (softmax probabilities), and the MLP, which a caller may replace. Run with
``frozen=None`` it is the model itself (a test checks its logits against the Hugging Face forward); run
with ``frozen=trace`` of a prompt, the norms and attention patterns are the prompt's constants, so the
residual stream is *linear* in what is written into it: the token embeddings, each MLP's replacement
(transcoder features, the skip path, biases) and the error terms. That linear map is what
workflows/attribution.py differentiates.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workflows.errors import UserError

SUPPORTED = ("llama", "mistral", "qwen2")

MlpFn = Callable[[int, Tensor], Tensor]
"""(layer, MLP input [B, T, D]) -> what the MLP adds to the residual stream [B, T, D]."""


@dataclass
class Trace:
    """One prompt's forward pass: the constants a local replacement model freezes and the true MLP values."""

    inv_attn_LT: Tensor
    """Per layer and position: 1 / RMS of the residual entering attention (the pre-attention norm's denominator)."""
    inv_mlp_LT: Tensor
    """The same before the MLP."""
    inv_final_T: Tensor
    """The same before the unembedding."""
    pattern_LHTT: Tensor
    """Attention probabilities of every layer and head."""
    mlp_in_LTD: Tensor
    """MLP inputs (after the pre-MLP norm): what a transcoder reads (hook_mlp_in)."""
    mlp_out_LTD: Tensor
    """MLP outputs: what a transcoder stands in for (hook_mlp_out)."""
    logits_TV: Tensor
    """The model's logits."""


class DecoderRunner:
    """The decoder's forward, written out from the Hugging Face modules of a Llama-family ``*ForCausalLM``."""

    def __init__(self, model: Any):
        kind = getattr(model.config, "model_type", "?")
        if kind not in SUPPORTED:
            raise UserError(
                f"attribution graphs support Llama-family models ({', '.join(SUPPORTED)}), not "
                f"{kind!r}; SmolLM2 and Llama models work"
            )
        self.model = model
        self.layers = model.model.layers
        self.n_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = model.config.num_attention_heads
        self.groups = self.n_heads // model.config.num_key_value_heads
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    @staticmethod
    def inv_rms(x_BTD: Tensor, norm: Any) -> Tensor:
        return torch.rsqrt(x_BTD.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

    def embed(self, ids_T: Tensor) -> Tensor:
        return self.model.model.embed_tokens(ids_T)[None]

    def attention(self, layer: int, a_BTD: Tensor, pattern_HTT: Tensor | None) -> tuple[Tensor, Tensor]:
        """(attention output, pattern); with a given pattern the output is linear in ``a_BTD``."""
        attn = self.layers[layer].self_attn
        B, T, _ = a_BTD.shape
        v = (
            attn.v_proj(a_BTD)
            .view(B, T, -1, self.head_dim)
            .transpose(1, 2)
            .repeat_interleave(self.groups, dim=1)
        )
        if pattern_HTT is None:
            q = attn.q_proj(a_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(a_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
            cos, sin = self.model.model.rotary_emb(a_BTD, torch.arange(T, device=a_BTD.device)[None])
            q, k = self.rope(q, k, cos, sin)
            k = k.repeat_interleave(self.groups, dim=1)
            scores = q @ k.transpose(-1, -2) * attn.scaling
            causal = torch.ones(T, T, dtype=torch.bool, device=a_BTD.device).triu(1)
            pattern = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        else:
            pattern = pattern_HTT.expand(B, -1, -1, -1)
        out = (pattern @ v).transpose(1, 2).reshape(B, T, -1)
        return attn.o_proj(out), pattern

    def run(
        self,
        resid_BTD: Tensor,
        mlp: MlpFn | None = None,
        frozen: Trace | None = None,
        record: dict[str, list[Tensor]] | None = None,
        last: bool = False,
    ) -> Tensor:
        """Logits [B, T, V] from the embedded tokens ``resid_BTD``; ``mlp`` replaces every MLP (default: the
        model's own), ``frozen`` fixes norms and attention patterns, ``record`` collects the trace's lists;
        ``last`` unembeds the last position only ([B, 1, V])."""
        r = resid_BTD
        for layer, block in enumerate(self.layers):
            inv = (
                frozen.inv_attn_LT[layer][..., None]
                if frozen is not None
                else self.inv_rms(r, block.input_layernorm)
            )
            attn_out, pattern = self.attention(
                layer,
                block.input_layernorm.weight * (r * inv),
                None if frozen is None else frozen.pattern_LHTT[layer],
            )
            r = r + attn_out
            inv2 = (
                frozen.inv_mlp_LT[layer][..., None]
                if frozen is not None
                else self.inv_rms(r, block.post_attention_layernorm)
            )
            m = block.post_attention_layernorm.weight * (r * inv2)
            out = block.mlp(m) if mlp is None else mlp(layer, m)
            if record is not None:
                for name, value in (
                    ("inv_attn", inv),
                    ("inv_mlp", inv2),
                    ("pattern", pattern),
                    ("mlp_in", m),
                    ("mlp_out", out),
                ):
                    record.setdefault(name, []).append(value[0].detach())
            r = r + out
        norm = self.model.model.norm
        inv_f = frozen.inv_final_T[..., None] if frozen is not None else self.inv_rms(r, norm)
        if record is not None:
            record["inv_final"] = [inv_f[0].detach()]
        if last:
            r, inv_f = r[:, -1:], inv_f[..., -1:, :]
        return self.model.lm_head(norm.weight * (r * inv_f))

    @torch.no_grad()
    def trace(self, ids_T: Tensor) -> Trace:
        """The prompt's forward pass through the real model, with everything a replacement model freezes."""
        rec: dict[str, list[Tensor]] = {}
        logits = self.run(self.embed(ids_T), record=rec)
        return Trace(
            inv_attn_LT=torch.stack(rec["inv_attn"])[..., 0],
            inv_mlp_LT=torch.stack(rec["inv_mlp"])[..., 0],
            inv_final_T=rec["inv_final"][0][..., 0],
            pattern_LHTT=torch.stack(rec["pattern"]),
            mlp_in_LTD=torch.stack(rec["mlp_in"]),
            mlp_out_LTD=torch.stack(rec["mlp_out"]),
            logits_TV=logits[0].detach(),
        )
