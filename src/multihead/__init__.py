"""multihead: multi-head attention for PyTorch, readable and fast.

Layout inside the library is (batch, heads, seq, head_dim); modules take
(batch, seq, embed). Boolean masks mean True = may attend.
"""

from . import masks
from .functional import attention, explain
from .masks import Mask
from .multi_head_attention import MultiHeadAttention

__version__ = "0.1.0"

__all__ = ["Mask", "MultiHeadAttention", "attention", "explain", "masks", "__version__"]
