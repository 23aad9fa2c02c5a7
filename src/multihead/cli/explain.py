"""``multihead explain``: the kernel `multihead.attention` picks for shapes and a mask, and why.

Nothing is computed: the inputs are zero-stride tensors of the asked shapes (no memory), so
any size within the limits answers at once. The mask is written as parts joined by ``&``:

    causal | causal:bottom-right | window:W | padding:L1,L2,... | documents:N1,N2,... | none

``padding`` gives each batch row's number of real keys; ``documents`` the lengths of the packed
documents, in order, which must add up to the sequence length.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .. import masks
from ..apps.limits import bounded_int
from ..masks import Mask
from ..report import explain_call
from .errors import UserError

__all__ = ["MAX_LEN", "add_command", "parse_mask"]

MAX_LEN = 262_144  # the block structure of longer masks takes seconds to work out
MAX_TILES = 1 << 23  # padding: batch rows × tiles, each row has its own blocks
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_command(commands: Any) -> None:
    explain = commands.add_parser(
        "explain",
        help="which kernel attention runs for given shapes and mask, and how much it computes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = bounded_int(1, 1024, "batch, heads and head_dim are at most 1024")
    length = bounded_int(0, MAX_LEN, f"lengths are at most {MAX_LEN:,}")
    explain.add_argument("--batch", type=size, help="batch size (default 1, or padding's rows)")
    explain.add_argument("--heads", type=size, default=8, help="query heads")
    explain.add_argument("--kv-heads", type=size, help="key/value heads (GQA; default --heads)")
    explain.add_argument("--q-len", type=length, default=1024, help="query positions")
    explain.add_argument("--k-len", type=length, help="key positions (default --q-len)")
    explain.add_argument("--head-dim", type=size, default=64, help="features per head")
    explain.add_argument(
        "--mask", default="none", help="e.g. causal, window:256, causal&documents:300,724"
    )
    explain.add_argument("--dtype", choices=list(DTYPES), default="float32")
    explain.add_argument("--device", choices=_devices(), default="cpu")
    explain.add_argument(
        "--kernel", choices=["auto", "reference", "sdpa", "tiled", "flex"], default="auto"
    )
    explain.add_argument(
        "--weights", action="store_true", help="the attention weights are asked for"
    )
    explain.set_defaults(run=run)


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _numbers(kind: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(
            f"--mask {kind}: expected whole numbers separated by commas, got {text!r}"
        ) from None
    if not values or len(values) > MAX_LEN or any(v < 0 or v > MAX_LEN for v in values):
        raise UserError(f"--mask {kind}: expected 1 to {MAX_LEN:,} numbers in [0, {MAX_LEN:,}]")
    return values


def parse_mask(spec: str, q_len: int, k_len: int) -> tuple[Mask | None, int | None]:
    """The mask that ``spec`` describes, and the batch size its padding part implies."""
    mask: Mask | None = None
    batch = None
    for part in spec.split("&"):
        kind, _, value = part.strip().partition(":")
        if kind == "none" and not value:
            continue
        if kind == "causal" and value in ("", "top-left", "bottom-right"):
            piece = masks.causal(q_len, k_len, align=value or "top-left")
        elif kind == "window":
            widths = _numbers(kind, value)
            if len(widths) != 1 or widths[0] < 1:
                raise UserError(f"--mask window: expected one width of at least 1, got {value!r}")
            piece = masks.sliding_window(q_len, k_len, window=widths[0])
        elif kind == "padding":
            lengths = _numbers(kind, value)
            if max(lengths) > k_len:
                raise UserError(f"--mask padding: a length of {max(lengths)} exceeds k_len {k_len}")
            piece, batch = masks.padding(lengths, k_len, q_len=q_len), len(lengths)
        elif kind == "documents":
            sizes = _numbers(kind, value)
            if q_len != k_len or sum(sizes) != k_len:
                raise UserError(
                    f"--mask documents: the lengths add up to {sum(sizes)}, but the sequence "
                    f"has {q_len} queries and {k_len} keys (they must all be equal)"
                )
            piece = masks.documents([i for i, n in enumerate(sizes) for _ in range(n)])
        else:
            raise UserError(
                f"--mask: unknown part {part.strip()!r}: use causal, causal:bottom-right, "
                "window:W, padding:L1,L2,..., documents:N1,N2,... or none, joined by &"
            )
        mask = piece if mask is None else mask & piece
    return mask, batch


def run(args: argparse.Namespace) -> int:
    k_len = args.q_len if args.k_len is None else args.k_len
    mask, rows = parse_mask(args.mask, args.q_len, k_len)
    batch = args.batch or rows or 1
    if rows is not None and batch != rows:
        raise UserError(f"--mask padding gives {rows} lengths but --batch is {batch}")
    tiles = batch * -(-args.q_len // 256) * -(-k_len // 128)
    if rows is not None and tiles > MAX_TILES:
        raise UserError(
            f"padding over {batch} rows of {args.q_len}×{k_len} scores has {tiles:,} tiles to "
            f"classify, more than the {MAX_TILES:,} explain examines: use fewer rows"
        )
    kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    zero = torch.zeros((), dtype=DTYPES[args.dtype], device=args.device)
    query = zero.expand(batch, args.heads, args.q_len, args.head_dim)
    key = zero.expand(batch, kv_heads, k_len, args.head_dim)
    report = explain_call(
        query, key, key, mask=mask, return_weights=args.weights, kernel=args.kernel
    )
    print(
        f"query {batch}×{args.heads}×{args.q_len}×{args.head_dim}, key/value "
        f"{batch}×{kv_heads}×{k_len}×{args.head_dim}, {args.dtype} on {args.device}, "
        f"mask {mask.name if mask is not None else 'none'}"
    )
    print(f"kernel: {report.explanation}")
    scores = f"{batch}×{args.heads}×{args.q_len}×{k_len}"
    if args.q_len == 0 or k_len == 0:
        print(f"computes no scores: the {scores} score matrix is empty")
    else:
        print(f"computes {100 * report.fraction:.1f} % of the {scores} scores")
    return 0
