"""`compat.MultiheadAttention`: a drop-in `torch.nn.MultiheadAttention` on `multihead.attention`.

Same constructor, attributes, parameter names (state dicts load both ways), forward signature
and returns as torch's module, so existing code and checkpoints keep working. It speaks
torch's conventions (sequence-first unless ``batch_first``; masks with True = *blocked*) and
translates them here, at the boundary and nowhere else, into the library's
(batch, heads, seq, head_dim) layout and True = may attend.

What it fixes:

- A query whose keys are all masked attends to nothing: its heads give 0 (so the layer gives
  ``out_proj.bias``) and its weights are 0, never NaN, and its gradients stay finite.
- ``is_causal=True`` works without an ``attn_mask``: the causal (top-left) mask is built here.
- ``need_weights=True`` is one pass of the reference kernel (weights in fp32), not a
  separate slow path; ``need_weights=False`` takes the fastest kernel.

What differs on purpose:

- With an ``attn_mask``, ``is_causal`` is only a hint, as in torch, and the ``attn_mask``
  given is what is applied (torch may apply its own causal mask instead, depending on
  ``need_weights`` and ``key_padding_mask``, so a wrong hint changes its answer; here it can't).
- In training with dropout, the returned weights are the attention distribution before
  dropout (torch returns them after).
- A bool ``key_padding_mask`` with a float ``attn_mask`` (or the reverse) is merged without
  torch's deprecation warning; bad input raises ``ValueError``/``TypeError``, not
  ``AssertionError``/``RuntimeError``. There is no NestedTensor fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .functional import attention
from .kernels.base import combine_masks

__all__ = ["MultiheadAttention"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _check_flag(name: str, value: object) -> bool:
    """A flag as torch reads it: any value with a truth value (``need_weights=0`` is False)."""
    try:
        return bool(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({error})") from None


def _merge(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    """Both masks at once (ours: bool True = may attend, or float added): `combine_masks`
    where one is bool (two bool masks intersect, a bool one blocks the other's bias); two
    float biases add, as in torch."""
    if first is None or second is None:
        return first if second is None else second
    if first.dtype == torch.bool:
        return combine_masks(first, second)
    if second.dtype == torch.bool:
        return combine_masks(second, first)
    return first + second


def _append_keys(mask: Tensor | None, extra: int) -> Tensor | None:
    """Let every query see the ``extra`` keys appended by add_bias_kv / add_zero_attn."""
    if mask is None or extra == 0:
        return mask
    return F.pad(mask, (0, extra), value=True if mask.dtype == torch.bool else 0.0)


class MultiheadAttention(nn.MultiheadAttention):
    """Multi-head attention (Vaswani et al., 2017) with torch's `nn.MultiheadAttention` API.

    Args:
        embed_dim: model width d_model; split across heads as num_heads × head_dim.
        num_heads: number of heads h.
        dropout: dropout on the attention weights while training.
        bias: biases on the input projections (W^Q, W^K, W^V) and the output projection W^O.
        add_bias_kv: append a learned key and value (bias_k, bias_v) to every sequence.
        add_zero_attn: append an all-zero key and value per head (a place to put no attention).
        kdim, vdim: feature sizes of key and value inputs; default embed_dim.
        batch_first: inputs and outputs are (batch, seq, feature) instead of (seq, batch, feature).
    """

    in_proj_weight: nn.Parameter | None
    q_proj_weight: nn.Parameter | None
    k_proj_weight: nn.Parameter | None
    v_proj_weight: nn.Parameter | None
    in_proj_bias: nn.Parameter | None
    bias_k: nn.Parameter | None
    bias_v: nn.Parameter | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # A subclass of torch's module, so isinstance checks (quantization mappings, wrap
        # policies, user code) hold; its parameters are made below, under torch's names, so
        # torch's __init__ is skipped.
        nn.Module.__init__(self)
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}): "
                "each head gets embed_dim / num_heads features"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise TypeError(f"dropout must be a float, got {type(dropout).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for name, flag in (
            ("bias", bias),
            ("add_bias_kv", add_bias_kv),
            ("add_zero_attn", add_zero_attn),
            ("batch_first", batch_first),
        ):
            _check_flag(name, flag)
        bias, add_bias_kv, add_zero_attn = bool(bias), bool(add_bias_kv), bool(add_zero_attn)
        batch_first = bool(batch_first)
        factory = {"device": device, "dtype": dtype}

        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else _check_positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else _check_positive_int("vdim", vdim)
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn

        # Parameters in torch's order and under torch's names, so that state dicts (and, with
        # the same seed, the initial values) are interchangeable.
        if self._qkv_same_embed_dim:  # W^Q, W^K, W^V stacked: self-attention is one matmul
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        # W^O: the Linear subclass torch uses, which quantize_dynamic leaves as it is
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: xavier-uniform W^Q/W^K/W^V, zero biases, xavier-normal bias_kv.

        W^O keeps nn.Linear's default initialisation, as in torch.
        """
        if self.in_proj_weight is not None:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                assert weight is not None
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None and self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    # -- checking torch's arguments ----------------------------------------------------------
    def _check_inputs(self, query: object, key: object, value: object) -> bool:
        """Validate query/key/value in torch's layout; return whether they are batched."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.is_nested:
                raise TypeError(f"{name} is a nested tensor; pass a key_padding_mask instead")
        assert isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
        if query.ndim not in (2, 3):
            raise ValueError(
                "query must be 2-D (L, E) unbatched or 3-D "
                f"({'N, L, E' if self.batch_first else 'L, N, E'}), "
                f"got shape {tuple(query.shape)}"
            )
        weight = self.out_proj.weight
        for name, x, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if x.ndim != query.ndim:
                raise ValueError(
                    f"{name} is {x.ndim}-D but query is {query.ndim}-D; "
                    "query, key and value must all be batched or all unbatched"
                )
            if x.shape[-1] != width:
                raise ValueError(f"{name} has {x.shape[-1]} features but the layer expects {width}")
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
            if x.dtype != weight.dtype:
                raise TypeError(
                    f"{name} has dtype {x.dtype} but the layer's weights are {weight.dtype}"
                )
            if x.device != weight.device:
                raise ValueError(f"{name} is on {x.device} but the layer is on {weight.device}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"key has shape {tuple(key.shape)} and value {tuple(value.shape)}; "
                "they must agree in every dimension but the features"
            )
        if query.ndim == 3:
            batch_dim = 0 if self.batch_first else 1
            if query.shape[batch_dim] != key.shape[batch_dim]:
                raise ValueError(
                    f"query has batch size {query.shape[batch_dim]} but key has "
                    f"{key.shape[batch_dim]} (batch_first={self.batch_first})"
                )
        return query.ndim == 3

    @staticmethod
    def _check_mask_type(name: str, mask: object, query: Tensor) -> Tensor:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(
                f"{name} must be bool (True = blocked) or floating (additive), got {mask.dtype}"
            )
        if mask.device != query.device:
            raise ValueError(f"{name} is on {mask.device} but query is on {query.device}")
        return mask

    def _masks(
        self,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        query: Tensor,
        batch: int,
        q_len: int,
        k_len: int,
        batched: bool,
    ) -> tuple[Tensor | None, bool]:
        """torch's two masks as one (N|1, H|1, L, S') in our polarity, S' with appended keys.

        Returns the mask and whether `attention` should add a causal mask itself.
        """
        heads, dtype = self.num_heads, query.dtype
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        padding = None
        if key_padding_mask is not None:
            self._check_mask_type("key_padding_mask", key_padding_mask, query)
            expected = (batch, k_len) if batched else (k_len,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)} but expected "
                    f"{'(N, S)' if batched else '(S,)'} = {expected}"
                )
            padding = key_padding_mask.reshape(batch, 1, 1, k_len)
            padding = ~padding if padding.dtype == torch.bool else padding.to(dtype)
        causal = False
        if attn_mask is not None:
            self._check_mask_type("attn_mask", attn_mask, query)
            expected_3d = (batch * heads, q_len, k_len)
            if tuple(attn_mask.shape) == (q_len, k_len):
                attn = attn_mask.reshape(1, 1, q_len, k_len)
            elif tuple(attn_mask.shape) == expected_3d:
                attn = attn_mask.reshape(batch, heads, q_len, k_len)
            else:
                n = "N*num_heads" if batched else "num_heads"
                raise ValueError(
                    f"attn_mask has shape {tuple(attn_mask.shape)} but expected 2-D (L, S) = "
                    f"{(q_len, k_len)} or 3-D ({n}, L, S) = {expected_3d}"
                )
            attn = ~attn if attn.dtype == torch.bool else attn.to(dtype)
        elif is_causal and extra == 0:
            attn, causal = None, True  # let the kernel take its causal fast path
        elif is_causal:  # the appended keys stay visible, as with torch's explicit causal mask
            attn = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
            attn = attn.view(1, 1, q_len, k_len)
        else:
            attn = None
        mask = _merge(_append_keys(attn, extra), _append_keys(padding, extra))
        if mask is not None:
            mask = mask.expand(mask.shape[0], mask.shape[1], q_len, k_len + extra)
        return mask, causal

    # -- forward ------------------------------------------------------------------------------
    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, same_qk: bool, same_kv: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Q = query W^Q, K = key W^K, V = value W^V.

        With stacked weights, self-attention is one matmul and keys/values from one memory
        are one more, as in torch.
        """
        e, weight, bias = self.embed_dim, self.in_proj_weight, self.in_proj_bias
        if weight is not None and same_kv:
            if same_qk:
                q, k, v = F.linear(query, weight, bias).split(e, dim=-1)
                return q, k, v
            q = F.linear(query, weight[:e], None if bias is None else bias[:e])
            k, v = F.linear(key, weight[e:], None if bias is None else bias[e:]).split(e, dim=-1)
            return q, k, v
        biases = (None, None, None) if bias is None else bias.chunk(3)
        if weight is None:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        else:
            weights = weight.chunk(3)
        q, k, v = (
            F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True)
        )
        return q, k, v

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value``, with torch's shapes and masks.

        Args:
            query: (L, N, E), or (N, L, E) with batch_first, or (L, E) unbatched.
            key, value: (S, N, kdim / vdim), batch-first or unbatched likewise.
            key_padding_mask: (N, S), or (S,) unbatched: bool True = padding (ignored), or
                a float added to the scores.
            need_weights: also return the attention weights.
            attn_mask: (L, S) or (N·num_heads, L, S): bool True = may NOT attend, or float
                added to the scores.
            average_attn_weights: average the weights over heads, else return them per head.
            is_causal: apply a causal mask (query i sees keys 0..i). With an attn_mask this is
                only a hint that attn_mask is causal, and attn_mask is applied as given.

        Returns (output, weights): output shaped as query; weights (N, L, S) averaged or
        (N, num_heads, L, S) per head, without N when unbatched, or None.
        """
        batched = self._check_inputs(query, key, value)
        need_weights = _check_flag("need_weights", need_weights)
        average_attn_weights = _check_flag("average_attn_weights", average_attn_weights)
        if not isinstance(is_causal, bool):  # torch's SDPA refuses anything else too
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")

        # torch's layout → (N, L, E), the same in every case.
        same_qk, same_kv = query is key, key is value
        if not batched:
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        batch, q_len, _ = query.shape
        k_len = key.shape[1]
        mask, causal = self._masks(
            key_padding_mask, attn_mask, is_causal, query, batch, q_len, k_len, batched
        )

        q, k, v = self._project(query, key, value, same_qk, same_kv)
        if self.bias_k is not None and self.bias_v is not None:  # one learned key/value more
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
        q, k, v = (
            x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for x in (q, k, v)
        )
        if self.add_zero_attn:  # a zero key/value per head: somewhere to put no attention
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))

        result = attention(
            q,
            k,
            v,
            mask=mask,
            causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=need_weights,
        )
        heads, weights = result if isinstance(result, tuple) else (result, None)
        output = self.out_proj(heads.transpose(1, 2).flatten(2))  # concat heads, then W^O

        if not batched:
            output = output.squeeze(0)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        if weights is not None:
            weights = weights.to(query.dtype)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return output, weights

    def merge_masks(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, query: Tensor
    ) -> tuple[Tensor | None, int | None]:
        """torch's contract, which `nn.TransformerEncoderLayer` calls on its inference fast
        path (torch's polarity: True = blocked, or a float bias): the key padding mask alone
        comes back as it is with type 1; an attention mask, (L, S) or (batch·heads, L, S),
        comes back as (batch, heads, L, S) with type 2, the padding (batch, S) added to it
        (for bool masks: or); neither gives (None, None). ``query`` is (batch, L, E)."""
        if attn_mask is None:
            return (None, None) if key_padding_mask is None else (key_padding_mask, 1)
        batch, q_len, k_len = query.shape[0], query.shape[1], attn_mask.shape[-1]
        if attn_mask.dim() == 3:
            merged = attn_mask.view(batch, -1, q_len, k_len)
        else:
            merged = attn_mask.expand(batch, self.num_heads, q_len, k_len)
        if key_padding_mask is not None:
            merged = merged + key_padding_mask.view(batch, 1, 1, k_len)
        return merged, 2

    def extra_repr(self) -> str:
        extra = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if not self._qkv_same_embed_dim:
            extra += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if self.bias_k is not None:
            extra += ", add_bias_kv=True"
        if self.add_zero_attn:
            extra += ", add_zero_attn=True"
        return extra + f", batch_first={self.batch_first}"
