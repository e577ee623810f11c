"""Skip transcoder (Paulo, Shabalin & Belrose 2025, "Transcoders beat sparse autoencoders"): a
transcoder plus a learned linear skip path, y_hat = decode(encode(x)) + x @ W_skip.T, W_skip [d_out, d_in]
initialised at zero. The latents only have to explain what a linear map of the MLP input cannot.

Saved as SAELens's ``skip_transcoder`` (relu) or ``jumprelu_skip_transcoder`` (everything else; see
transcoder.py for how TopK-family encoders are exported).
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_core.architectures.transcoder import Transcoder, TranscoderConfig
from sae_core.registry import register


@dataclass(kw_only=True)
class SkipTranscoderConfig(TranscoderConfig):
    """Same fields as a transcoder; the skip path has no knobs."""


class SkipTranscoder(Transcoder):
    skip = True
    cfg: SkipTranscoderConfig


register("skip_transcoder", SkipTranscoderConfig, SkipTranscoder,
         "Transcoder with a learned linear skip connection W_skip (Paulo et al. 2025)")
