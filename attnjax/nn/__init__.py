"""Flax NNX modules: thin shells that own parameters and call `attnjax.ops`."""

from attnjax.nn.attention import Attention
from attnjax.nn.generate import generate, sample_logits
from attnjax.nn.lm import Block, DecoderLM, parse_layer_pattern
from attnjax.nn.mlp import SwiGLU
from attnjax.nn.norm import RMSNorm
from attnjax.nn.recycled import RecycledAttention
from attnjax.nn.rope import apply_rope
from attnjax.nn.streaming import StreamingLLM
from attnjax.nn.tidal import TidalDecode

__all__ = [
  "Attention",
  "Block",
  "DecoderLM",
  "RMSNorm",
  "RecycledAttention",
  "StreamingLLM",
  "SwiGLU",
  "TidalDecode",
  "apply_rope",
  "generate",
  "parse_layer_pattern",
  "sample_logits",
]
