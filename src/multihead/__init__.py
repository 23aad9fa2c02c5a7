"""multihead: multi-head attention for PyTorch, readable and fast.

Layout inside the library is (batch, heads, seq, head_dim); modules take
(batch, seq, embed). Boolean masks mean True = may attend.
"""

from . import compat, masks, score_mods
from .attention_config import AttentionConfig
from .cache import AttentionCache, CrossAttentionCache, KVCache, SlidingWindowKVCache
from .distributed import RingAttention, ring_attention
from .functional import attention, explain
from .kernels.weights import tiled_weights as attention_weights
from .masks import Mask
from .models import LMConfig, Seq2SeqConfig, Seq2SeqTransformer, TransformerLM
from .multi_head_attention import MultiHeadAttention
from .positional import ALiBi, RelativePositionBias, RotaryEmbedding, alibi_bias
from .report import explain_call, explain_module
from .transformer import Decoder, DecoderLayer, DecoderOnly, DecoderOnlyLayer, Encoder, EncoderLayer
from .varlen import attention_varlen, pack, unpack

__version__ = "0.1.0"

__all__ = ["Mask", "MultiHeadAttention", "attention", "compat", "explain", "masks", "__version__"]
__all__ += ["score_mods"]
__all__ += ["AttentionCache", "CrossAttentionCache", "KVCache"]
__all__ += ["Decoder", "DecoderLayer", "Encoder", "EncoderLayer"]
__all__ += ["AttentionConfig", "DecoderOnly", "DecoderOnlyLayer"]
__all__ += ["LMConfig", "Seq2SeqConfig", "Seq2SeqTransformer", "TransformerLM"]
__all__ += ["SlidingWindowKVCache", "attention_varlen", "pack", "unpack"]
__all__ += ["ALiBi", "RelativePositionBias", "RotaryEmbedding", "alibi_bias"]
__all__ += ["attention_weights", "explain_call", "explain_module"]
__all__ += ["RingAttention", "ring_attention"]
