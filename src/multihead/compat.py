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
  So the ``attn_mask`` is always checked too: one of the wrong shape raises ``ValueError``
  where torch, with ``need_weights=False`` and no ``key_padding_mask``, drops it unchecked.
- In training with dropout, the returned weights are the attention distribution before
  dropout (torch returns them after).
- A bool ``key_padding_mask`` with a float ``attn_mask`` (or the reverse) is merged without
  torch's deprecation warning; bad input raises ``ValueError``/``TypeError``, not
  ``AssertionError``/``RuntimeError``. There is no NestedTensor fast path: a nested query,
  key or value raises ``TypeError`` (pad the batch and pass a ``key_padding_mask``).
- An ``in_proj_bias`` (or ``bias_k``/``bias_v``) of another float dtype than the weights is
  applied in the weights' dtype in every layout. torch gives that answer where its projection
  happens to see a non-contiguous input (``batch_first``) and raises elsewhere.
"""

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .functional import attention
from .kernels.base import bad_queries, combine_masks
from .multi_head_attention import check_like_weights

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


@contextlib.contextmanager
def _checks_while_tracing() -> Iterator[None]:
    """Input checks compare sizes as Python values, which `torch.jit.trace` warns about (the
    trace keeps them fixed). A check only decides whether to raise, never what is recorded,
    so its warnings are silenced here; what shapes the graph is read from ``ndim``."""
    if not torch.jit.is_tracing():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _traced_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """softmax(Q Kᵀ · scale) V, the reference kernel's steps, as `torch.jit.trace` records
    them: out of place whatever the grad mode (the kernels reuse buffers when autograd is
    off, which changes the graph between the trace and its no-grad check) and with sizes
    left as traced values. A query that sees no key gets 0; a NaN/inf query row gives NaN."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(compute) * scale) @ k.to(compute).transpose(-2, -1)
    if causal:
        visible = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
        scores = scores.masked_fill(~visible.tril(), -torch.inf)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -torch.inf)
        else:
            scores = scores + mask.to(compute)
        empty = scores.amax(dim=-1, keepdim=True) == -torch.inf
        weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        weights = torch.softmax(scores, dim=-1)
    attended = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    broken = bad_queries(q).unsqueeze(-1)
    output = (attended @ v.to(compute)).to(q.dtype).masked_fill(broken, math.nan)
    return output, weights.masked_fill(broken, math.nan)


# -- torch's arguments, checked and translated --------------------------------------------------
# Functions of the layer (``mha``) rather than methods: a scripted layer runs its Python forward
# on a stand-in module that has the compiled methods and the attributes, not these helpers.


def _check_inputs(mha: nn.MultiheadAttention, query: object, key: object, value: object) -> bool:
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
            f"({'N, L, E' if mha.batch_first else 'L, N, E'}), "
            f"got shape {tuple(query.shape)}"
        )
    weight = mha.out_proj.weight
    for name, x, width in (
        ("query", query, mha.embed_dim),
        ("key", key, mha.kdim),
        ("value", value, mha.vdim),
    ):
        if x.ndim != query.ndim:
            raise ValueError(
                f"{name} is {x.ndim}-D but query is {query.ndim}-D; "
                "query, key and value must all be batched or all unbatched"
            )
        if x.shape[-1] != width:
            raise ValueError(f"{name} has {x.shape[-1]} features but the layer expects {width}")
        check_like_weights(name, x, weight)
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"key has shape {tuple(key.shape)} and value {tuple(value.shape)}; "
            "they must agree in every dimension but the features"
        )
    if query.ndim == 3:
        batch_dim = 0 if mha.batch_first else 1
        if query.shape[batch_dim] != key.shape[batch_dim]:
            raise ValueError(
                f"query has batch size {query.shape[batch_dim]} but key has "
                f"{key.shape[batch_dim]} (batch_first={mha.batch_first})"
            )
    return query.ndim == 3


def _check_masks(
    mha: nn.MultiheadAttention,
    key_padding_mask: object,
    attn_mask: object,
    query: Tensor,
    batch: int,
    q_len: int,
    k_len: int,
    batched: bool,
) -> None:
    """Validate torch's two masks against (N, L, E) ``query`` and ``k_len`` keys."""
    if key_padding_mask is not None:
        _check_mask_type("key_padding_mask", key_padding_mask, query)
        assert isinstance(key_padding_mask, Tensor)
        expected = (batch, k_len) if batched else (k_len,)
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)} but expected "
                f"{'(N, S)' if batched else '(S,)'} = {expected}"
            )
    if attn_mask is not None:
        _check_mask_type("attn_mask", attn_mask, query)
        assert isinstance(attn_mask, Tensor)
        expected_3d = (batch * mha.num_heads, q_len, k_len)
        if tuple(attn_mask.shape) not in ((q_len, k_len), expected_3d):
            n = "N*num_heads" if batched else "num_heads"
            raise ValueError(
                f"attn_mask has shape {tuple(attn_mask.shape)} but expected 2-D (L, S) = "
                f"{(q_len, k_len)} or 3-D ({n}, L, S) = {expected_3d}"
            )


def _masks(
    mha: nn.MultiheadAttention,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    query: Tensor,
    batch: int,
    q_len: int,
    k_len: int,
) -> tuple[Tensor | None, bool]:
    """torch's two (checked) masks as one (N|1, H|1, L, S') in our polarity, S' with the
    appended keys. Returns the mask and whether `attention` should add a causal mask
    itself. Sizes are only passed on, never compared, so a trace records them."""
    dtype = query.dtype
    extra = int(mha.bias_k is not None) + int(mha.add_zero_attn)
    padding = None
    if key_padding_mask is not None:
        padding = key_padding_mask.reshape(batch, 1, 1, k_len)
        padding = ~padding if padding.dtype == torch.bool else padding.to(dtype)
    causal = False
    if attn_mask is not None:
        if attn_mask.ndim == 2:
            attn = attn_mask.reshape(1, 1, q_len, k_len)
        else:
            attn = attn_mask.reshape(batch, mha.num_heads, q_len, k_len)
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


def _project(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    same_qk: bool,
    same_kv: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Q = query W^Q, K = key W^K, V = value W^V.

    With stacked weights, self-attention is one matmul and keys/values from one memory
    are one more, as in torch. A bias of another dtype than the weights is added in the
    weights' dtype, as torch's module does where it accepts one (batch_first).
    """
    e, weight, bias = mha.embed_dim, mha.in_proj_weight, mha.in_proj_bias
    if bias is not None:
        bias = bias.to(query.dtype)
    if weight is not None and same_kv:
        if same_qk:
            q, k, v = F.linear(query, weight, bias).split(e, dim=-1)
            return q, k, v
        q = F.linear(query, weight[:e], None if bias is None else bias[:e])
        k, v = F.linear(key, weight[e:], None if bias is None else bias[e:]).split(e, dim=-1)
        return q, k, v
    biases = (None, None, None) if bias is None else bias.chunk(3)
    if weight is None:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    else:
        weights = weight.chunk(3)
    q, k, v = (
        F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True)
    )
    return q, k, v


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

    Toolchain (each checked against torch's module in tests/test_compat_toolchain.py):

    - ``torch.jit.script`` works alone and inside ``nn.TransformerEncoderLayer`` /
      ``nn.TransformerEncoder`` (their fused fast path included): ``forward`` compiles to a
      call of the Python implementation (``@torch.jit.ignore``), ``merge_masks`` to
      TorchScript. So a scripted model runs only inside Python: ``torch.jit.save`` refuses
      it ("Could not export Python function call"). Save the state dict instead.
    - ``torch.jit.trace`` passes its check, with no TracerWarning: while tracing, the layer
      records the reference kernel's steps out of place (no fast kernel is traced) and one
      projection per input. As with any trace, it holds for inputs of the traced shapes.
    - ``quantize_dynamic(model, {nn.Linear})`` leaves the layer in float, as it does torch's:
      ``out_proj`` is torch's ``NonDynamicallyQuantizableLinear`` and is read, not called.
    - Flags take any truth value, as in torch (``need_weights=0``); ``is_causal`` takes a bool.
    """

    # No class-level annotations beyond torch's own (bias_k, bias_v): TorchScript reads them,
    # and `nn.TransformerEncoderLayer`'s scripted fast path needs in_proj_weight/in_proj_bias
    # typed from their values (Tensor), not as Optional.

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

    # -- forward ------------------------------------------------------------------------------
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
        # TorchScript compiles this signature (with its defaults, which an ignored method's
        # schema lacks) and calls the Python implementation below.
        return self._forward(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )

    @torch.jit.ignore
    def _forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """`forward` in Python: run as it is, also from a scripted module."""
        tracing = torch.jit.is_tracing()
        with _checks_while_tracing():
            batched = _check_inputs(self, query, key, value)
            need_weights = _check_flag("need_weights", need_weights)
            average_attn_weights = _check_flag("average_attn_weights", average_attn_weights)
            if not isinstance(is_causal, bool):  # torch's SDPA refuses anything else too
                raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
            seq_dim = 1 if batched and self.batch_first else 0
            batch = query.shape[1 - seq_dim] if batched else 1
            q_len, k_len = query.shape[seq_dim], key.shape[seq_dim]
            _check_masks(self, key_padding_mask, attn_mask, query, batch, q_len, k_len, batched)

        # torch's layout → (N, L, E), the same in every case. A trace records one projection
        # per input: it is replayed on inputs that need not be the same tensors.
        same_qk, same_kv = query is key and not tracing, key is value and not tracing
        if not batched:
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        mask, causal = _masks(
            self, key_padding_mask, attn_mask, is_causal, query, batch, q_len, k_len
        )

        q, k, v = _project(self, query, key, value, same_qk, same_kv)
        if self.bias_k is not None and self.bias_v is not None:  # one learned key/value more
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(batch, 1, -1)], dim=1)
        q, k, v = (
            x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for x in (q, k, v)
        )
        if self.add_zero_attn:  # a zero key/value per head: somewhere to put no attention
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))

        dropout_p = self.dropout if self.training else 0.0
        if tracing:
            heads, weights = _traced_attention(
                q, k, v, mask, causal, 1.0 / math.sqrt(self.head_dim), dropout_p
            )
            weights = weights if need_weights else None
        else:
            result = attention(
                q, k, v, mask=mask, causal=causal, dropout_p=dropout_p, return_weights=need_weights
            )
            heads, weights = result if isinstance(result, tuple) else (result, None)
        # concat heads, then W^O (its weights, as torch reads them: out_proj is not called)
        output = F.linear(
            heads.transpose(1, 2).flatten(2), self.out_proj.weight, self.out_proj.bias
        )

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
        (for bool masks: or); neither gives (None, None). ``query`` is (batch, L, E).
        TorchScript compiles it (a scripted encoder layer calls it)."""
        if attn_mask is None:
            if key_padding_mask is None:
                return None, None
            return key_padding_mask, 1
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
