"""The decode step: one generation step for rows each at its own position, in a few fused ops.

`DecodeStep` (step.py) computes the logits of a batch of rows -- prompt tokens or one new
token per sequence, each with its own KV-cache slot and position -- with one fused op per
half block (tfshard/layers/kernels/decode_ops.cc) between the tensor-parallel collectives.
`FusedGenerate` (generate.py) runs keras-hub's `generate` on it; the server's continuous
batching drives it directly. `decoder.py` reads what a keras-hub decoder computes,
`params.py` how the ops read each weight.
"""

from tfshard.decode.decoder import FAMILIES, Decoder, read
from tfshard.decode.generate import ENV, FusedGenerate, fused_generate, mode
from tfshard.decode.params import Unsupported
from tfshard.decode.step import Cache, DecodeStep

__all__ = ["Cache", "DecodeStep", "Decoder", "ENV", "FAMILIES", "FusedGenerate",
           "Unsupported", "fused_generate", "mode", "read"]
