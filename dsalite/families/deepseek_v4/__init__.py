"""DeepSeek-V4 (`deepseek_v4`): everything V4 adds on top of the shared stack, registered under its model_type.

Same as the MLA families except: the residual is hc_mult mHC streams (`layers/hyper.py`), attention is sliding-window
+ compressed entries (CSA with its own indexer, HCA) with a single shared K=V head and a grouped low-rank output
(`layers/v4_block.py`, `layers/compressor.py`, `layers/window_attention.py`), routing is hash (first layers) or
sqrtsoftplus scores with a clamped SwiGLU (`layers/moe.py`), and two rope tables. This package holds the glue:
config.py (both config spellings), checkpoint.py (the name table of both on-disk layouts), cache.py (window +
compressor state), gguf.py (llama.cpp's deepseek4), verify.py (CSA selection parity).
"""

from dsalite.families import Family, register
from dsalite.families.deepseek_v4 import cache, checkpoint, config, gguf, verify
from dsalite.layers.norm import RMSNormF32
from dsalite.layers.v4_block import HyperBlock, HyperMTPLayer

FAMILY = register(Family(
    "deepseek_v4", config=config, block=HyperBlock, mtp_layer=HyperMTPLayer, norm=RMSNormF32, cache=cache.V4Cache,
    checkpoint=checkpoint, gguf=gguf, verify=verify,
))
