"""Masks against dense tensors built by hand (True = may attend)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from multihead import masks
from multihead.masks import EMPTY, FULL, PARTIAL, Mask


def dense(rows: list[list[int]]) -> torch.Tensor:
    """A hand-written 0/1 matrix as the (1, 1, q_len, k_len) bool tensor to_dense returns."""
    return torch.tensor(rows, dtype=torch.bool).view(1, 1, len(rows), -1)


def build(fn, batch: int, q_len: int, k_len: int) -> torch.Tensor:
    """Dense (batch, q_len, k_len) bool tensor from a Python predicate fn(b, q, k)."""
    return torch.tensor(
        [[[bool(fn(b, i, j)) for j in range(k_len)] for i in range(q_len)] for b in range(batch)],
        dtype=torch.bool,
    ).view(batch, q_len, k_len)


# -- each constructor against a hand-built tensor ----------------------------------------------
def test_causal_top_left_square():
    expected = dense([[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    assert torch.equal(masks.causal(3).to_dense(), expected)


def test_causal_top_left_fewer_queries_than_keys():
    expected = dense([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert torch.equal(masks.causal(3, 5).to_dense(), expected)


def test_causal_top_left_more_queries_than_keys():
    expected = dense([[1, 0], [1, 1], [1, 1], [1, 1]])
    assert torch.equal(masks.causal(4, 2, align="top-left").to_dense(), expected)


def test_causal_bottom_right_fewer_queries_than_keys():
    # Decoding 3 new queries after 2 cached keys: the last query sees every key.
    expected = dense([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(masks.causal(3, 5, align="bottom-right").to_dense(), expected)


def test_causal_bottom_right_more_queries_than_keys_has_empty_rows():
    expected = dense([[0, 0], [0, 0], [1, 0], [1, 1]])
    assert torch.equal(masks.causal(4, 2, align="bottom-right").to_dense(), expected)


def test_causal_alignments_agree_when_square():
    top_left = masks.causal(6, 6, align="top-left").to_dense()
    assert torch.equal(masks.causal(6, 6, align="bottom-right").to_dense(), top_left)


def test_padding_with_q_len():
    mask = masks.padding([2, 0, 3], max_len=4, q_len=2)
    assert (mask.q_len, mask.k_len, mask.batch) == (2, 4, 3)
    row = {0: [1, 1, 0, 0], 1: [0, 0, 0, 0], 2: [1, 1, 1, 0]}
    expected = torch.tensor([[row[b]] * 2 for b in range(3)], dtype=torch.bool).unsqueeze(1)
    assert torch.equal(mask.to_dense(), expected)


def test_padding_defaults_to_longest_and_self_attention():
    mask = masks.padding(torch.tensor([1, 3]))
    assert (mask.q_len, mask.k_len, mask.batch) == (3, 3, 2)
    expected = torch.stack([dense([[1, 0, 0]] * 3)[0], dense([[1, 1, 1]] * 3)[0]])  # (2, 1, 3, 3)
    assert torch.equal(mask.to_dense(), expected)


def test_padding_with_empty_batch():
    mask = masks.padding(torch.zeros(0, dtype=torch.long), max_len=3, q_len=2)
    assert mask.to_dense().shape == (0, 1, 2, 3)
    assert mask.block_structure(2, 2).shape == (0, 1, 1, 2)


def test_sliding_window_top_left():
    expected = dense(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(masks.sliding_window(5, window=2).to_dense(), expected)


def test_sliding_window_bottom_right():
    expected = dense([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    mask = masks.sliding_window(3, 5, window=2, align="bottom-right")
    assert torch.equal(mask.to_dense(), expected)


def test_sliding_window_wider_than_sequence_is_causal():
    wide = masks.sliding_window(4, 6, window=100).to_dense()
    assert torch.equal(wide, masks.causal(4, 6).to_dense())


def test_documents_1d():
    expected = dense(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    mask = masks.documents([0, 0, 1, 1, 2])
    assert mask.batch is None
    assert torch.equal(mask.to_dense(), expected)


def test_documents_2d():
    mask = masks.documents(torch.tensor([[0, 0, 1], [5, 7, 7]]))
    assert mask.batch == 2
    expected = torch.cat(
        [
            dense([[1, 1, 0], [1, 1, 0], [0, 0, 1]]),
            dense([[1, 0, 0], [0, 1, 1], [0, 1, 1]]),
        ]
    )
    assert torch.equal(mask.to_dense(), expected)


def test_documents_and_causal_packed_lm():
    mask = masks.documents([0, 0, 0, 1, 1]) & masks.causal(5)
    expected = dense(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(mask.to_dense(), expected)


def test_to_dense_is_bool_on_requested_device():
    out = masks.padding([1, 2]).to_dense("cpu")
    assert out.dtype == torch.bool and out.device.type == "cpu"


def test_block_structure_small_hand_case():
    # causal 4x4 in 2x2 tiles: diagonal tiles partial, below full, above empty.
    got = masks.causal(4).block_structure(2, 2)
    assert got.dtype == torch.int8
    assert got.tolist() == [[[[PARTIAL, EMPTY], [FULL, PARTIAL]]]]  # (batch, heads, 2, 2)


def test_block_structure_ignores_padding_past_the_end():
    # 3 keys in tiles of 2: the last tile holds one real key, which every query sees.
    got = masks.causal(2, 3, align="bottom-right").block_structure(2, 2)
    assert got.tolist() == [[[[FULL, PARTIAL]]]]


# -- hypothesis: algebra and block structure against dense tensors ---------------------------
@st.composite
def atoms(draw, batch: int, q_len: int, k_len: int):
    """One constructor call with its dense (batch|1, q_len, k_len) tensor built by hand."""
    kinds = ["causal", "sliding", "padding"]
    if q_len == k_len:
        kinds += ["documents1d", "documents2d"]
    kind = draw(st.sampled_from(kinds))
    align = draw(st.sampled_from(["top-left", "bottom-right"]))
    offset = 0 if align == "top-left" else k_len - q_len
    if kind == "causal":
        mask = masks.causal(q_len, k_len, align=align)
        return mask, build(lambda b, i, j: j <= i + offset, 1, q_len, k_len)
    if kind == "sliding":
        w = draw(st.integers(1, k_len + 1))
        mask = masks.sliding_window(q_len, k_len, window=w, align=align)
        return mask, build(lambda b, i, j: i + offset - w < j <= i + offset, 1, q_len, k_len)
    if kind == "padding":
        lengths = draw(st.lists(st.integers(0, k_len), min_size=batch, max_size=batch))
        mask = masks.padding(lengths, max_len=k_len, q_len=q_len)
        return mask, build(lambda b, i, j: j < lengths[b], batch, q_len, k_len)
    rows = 1 if kind == "documents1d" else batch
    ids = draw(
        st.lists(
            st.lists(st.integers(0, 3), min_size=q_len, max_size=q_len),
            min_size=rows,
            max_size=rows,
        )
    )
    mask = masks.documents(ids[0] if kind == "documents1d" else ids)
    return mask, build(lambda b, i, j: ids[b][i] == ids[b][j], rows, q_len, k_len)


@st.composite
def mask_pairs(draw):
    batch = draw(st.integers(1, 3))
    q_len = draw(st.integers(1, 8))
    k_len = q_len if draw(st.booleans()) else draw(st.integers(1, 8))
    first = draw(atoms(batch, q_len, k_len))
    second = draw(atoms(batch, q_len, k_len))
    return first, second


def _check(mask: Mask, expected: torch.Tensor) -> None:
    got = mask.to_dense()
    assert got.dtype == torch.bool
    assert got.shape == (expected.shape[0], 1, *expected.shape[1:])
    assert torch.equal(got[:, 0], expected)


@given(mask_pairs())
def test_constructors_match_hand_built(pair):
    for mask, expected in pair:
        _check(mask, expected)


@given(mask_pairs())
def test_and_or_invert_equal_elementwise_ops(pair):
    (a, da), (b, db) = pair
    _check(a & b, da & db)
    _check(a | b, da | db)
    _check(~a, ~da)
    _check(~(a & b), ~da | ~db)  # De Morgan through the Mask algebra
    assert (a & b).batch == (a.batch if a.batch is not None else b.batch)


def _classify(full: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """EMPTY / PARTIAL / FULL per tile, from a dense (batch, q_len, k_len) mask, by loops."""
    batch, q_len, k_len = full.shape
    n_q, n_k = -(-q_len // block_q), -(-k_len // block_k)
    out = torch.empty(batch, n_q, n_k, dtype=torch.int8)
    for b in range(batch):
        for i in range(n_q):
            for j in range(n_k):
                tile = full[b, i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
                out[b, i, j] = FULL if tile.all() else PARTIAL if tile.any() else EMPTY
    return out


OPS = ["&", "|", "a", "~", "& ~", "~(|)", "fn"]


@given(mask_pairs(), st.integers(1, 5), st.integers(1, 5), st.sampled_from(OPS))
def test_block_structure_matches_dense_classification(pair, block_q, block_k, op):
    """Every kind's structure, and each operator's combination of its operands' structures
    (evaluating only tiles both leave cut), equals the classification of the dense mask."""
    (a, da), (b, db) = pair
    as_function = masks.from_function(a.mask_mod, a.q_len, a.k_len, batch=a.batch)
    mask, expected = {
        "&": (a & b, da & db),
        "|": (a | b, da | db),
        "a": (a, da),
        "~": (~a, ~da),
        "& ~": (a & ~b, da & ~db),
        "~(|)": (~(a | b), ~(da | db)),
        "fn": (as_function & b, da & db),
    }[op]
    got = mask.block_structure(block_q, block_k)
    assert torch.equal(got.squeeze(1), _classify(expected, block_q, block_k))


# -- errors ------------------------------------------------------------------------------------
def test_combining_different_sizes_raises():
    with pytest.raises(ValueError, match="different sizes.*3x3.*4x4"):
        masks.causal(3) & masks.causal(4)
    with pytest.raises(ValueError, match="different sizes"):
        masks.causal(3, 4) | masks.causal(4, 3)


def test_combining_different_batches_raises():
    with pytest.raises(ValueError, match="different batch sizes"):
        masks.padding([1, 2], max_len=3) & masks.padding([1, 2, 3], max_len=3)
    with pytest.raises(ValueError, match="different batch sizes"):
        masks.padding([1, 2], max_len=3) | masks.documents([[0, 0, 1]] * 3)


def test_combining_with_a_tensor_raises_type_error():
    with pytest.raises(TypeError, match="only combine a Mask with a Mask"):
        masks.causal(3) & torch.ones(3, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: masks.causal(-1), ValueError, "q_len must be >= 0"),
        (lambda: masks.causal(3, -2), ValueError, "k_len must be >= 0"),
        (lambda: masks.causal(2.0), TypeError, "q_len must be an int"),
        (lambda: masks.causal(True), TypeError, "q_len must be an int"),
        (lambda: masks.causal(3, align="left"), ValueError, "align must be one of"),
        (lambda: masks.sliding_window(4, window=0), ValueError, "window must be >= 1"),
        (lambda: masks.sliding_window(4, window=-1), ValueError, "window must be >= 0"),
        (lambda: masks.sliding_window(4, window=1.5), TypeError, "window must be an int"),
        (lambda: masks.sliding_window(4, window=2, align="middle"), ValueError, "align"),
        (lambda: masks.padding([[1, 2]]), ValueError, "lengths must be 1-D"),
        (lambda: masks.padding([1.0, 2.0]), TypeError, "lengths must be an integer"),
        (lambda: masks.padding([True, False]), TypeError, "lengths must be an integer"),
        (lambda: masks.padding([1, -1]), ValueError, "lengths must be >= 0"),
        (lambda: masks.padding([1, 5], max_len=4), ValueError, "max_len=4"),
        (lambda: masks.padding([1, 2], q_len=-1), ValueError, "q_len must be >= 0"),
        (lambda: masks.documents([0.0, 1.0]), TypeError, "doc_ids must be an integer"),
        (lambda: masks.documents([[[0]]]), ValueError, r"doc_ids must be \(seq,\)"),
        (lambda: masks.causal(4).block_structure(0, 2), ValueError, "block sizes"),
        (lambda: masks.causal(4).block_structure(2, -1), ValueError, "block sizes"),
    ],
)
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("align", ["top-left", "bottom-right"])
@pytest.mark.parametrize("window", [None, 1, 3, 10])
@pytest.mark.parametrize(("q_len", "k_len"), [(1, 1), (5, 7), (16, 16), (33, 40), (40, 9)])
@pytest.mark.parametrize(("block_q", "block_k"), [(1, 1), (2, 3), (5, 4), (8, 16)])
def test_band_block_structure_equals_the_pairwise_one(
    align, window, q_len, k_len, block_q, block_k
):
    """Causal and sliding-window masks classify tiles from the band's edges; the generic
    method, which evaluates every (query, key) pair, is the oracle."""
    band = (
        masks.causal(q_len, k_len, align=align)
        if window is None
        else masks.sliding_window(q_len, k_len, window=window, align=align)
    )
    pairwise = masks.Mask.block_structure(band, block_q, block_k)
    assert torch.equal(band.block_structure(block_q, block_k), pairwise)


# -- from_function: FlexAttention's mask_mod signature ---------------------------------------
def prefix_lm(b, h, q_idx, kv_idx):
    """A FlexAttention mask_mod: the first 3 keys are seen by all, the rest causally."""
    return (kv_idx < 3) | (kv_idx <= q_idx)


def test_from_function_evaluates_a_flex_style_mask_mod():
    mask = masks.from_function(prefix_lm, 6, 7)
    expected = build(lambda b, i, j: j < 3 or j <= i, 1, 6, 7)
    _check(mask, expected)
    assert mask.name == "prefix_lm" and repr(mask) == "Mask(prefix_lm, 6x7)"


def test_a_mask_mod_that_reads_the_head_gives_a_mask_per_head():
    def per_head(b, h, q, k):
        return (q - k).abs() <= h  # head h sees h positions either side

    mask = masks.from_function(per_head, 5, heads=3)
    dense = mask.to_dense()
    assert dense.shape == (1, 3, 5, 5)
    for h in range(3):
        want = build(lambda b, i, j, h=h: abs(i - j) <= h, 1, 5, 5)[0]
        assert torch.equal(dense[0, h], want)
    structure = mask.block_structure(2, 2)
    assert structure.shape == (1, 3, 3, 3)
    assert structure[0, 0, 0, 1] == EMPTY and structure[0, 2, 0, 1] == PARTIAL


@pytest.fixture
def evaluated(monkeypatch) -> list[int]:
    """The area (queries × keys) of every `Mask.evaluate` call made while the test runs."""
    calls: list[int] = []
    original = masks.Mask.evaluate

    def recording(self, q0, q1, k0, k1, device=None):
        calls.append((q1 - q0) * (k1 - k0))
        return original(self, q0, q1, k0, k1, device)

    monkeypatch.setattr(masks.Mask, "evaluate", recording)
    return calls


def test_block_structure_is_computed_once_and_never_over_the_whole_matrix(evaluated):
    calls = evaluated
    mask = masks.from_function(prefix_lm, 64)
    first = mask.block_structure(8, 8)
    assert max(calls) == 8 * 64  # one row of tiles at a time
    calls.clear()
    assert mask.block_structure(8, 8) is first and calls == []  # cached on the mask


def test_causal_and_padding_evaluate_only_the_tiles_both_cut(evaluated):
    """The built-in kinds give their structure from their parameters; `&` evaluates only
    the tiles that both operands leave partial (here: where the diagonal meets the padding
    edge), not all N² pairs."""
    calls = evaluated
    n = 1024
    mask = masks.causal(n) & masks.padding([n, 700, 300], max_len=n)
    structure = mask.block_structure(64, 64)
    assert sum(calls) <= 4 * 64 * 64  # a few tiles, against n² = 1,048,576 pairs
    assert torch.equal(structure, masks.Mask._structure(mask, 64, 64))  # exact all the same


def test_window_takes_its_size_by_keyword_only():
    with pytest.raises(TypeError):
        masks.sliding_window(64, 16)  # would otherwise read as k_len=16
    with pytest.raises(TypeError):
        masks.causal(4, 4, "bottom-right")  # align is keyword-only


def test_from_function_refuses_bad_arguments():
    with pytest.raises(TypeError, match="mask_mod must be callable"):
        masks.from_function("causal", 4)
    with pytest.raises(TypeError, match="returned torch.float32"):
        masks.from_function(lambda b, h, q, k: (q - k).float(), 4).to_dense()
    with pytest.raises(ValueError, match="heads must be >= 0"):
        masks.from_function(prefix_lm, 4, heads=-1)
    with pytest.raises(ValueError, match="different heads sizes"):
        masks.from_function(prefix_lm, 4, heads=2) & masks.from_function(prefix_lm, 4, heads=3)


def test_documents_in_runs_take_their_structure_from_the_bounds(evaluated):
    """Packed documents (each one contiguous run) are not evaluated pair by pair; ids that
    come back after another document are, and both equal the pairwise classification."""
    runs = masks.documents([[0] * 5 + [1] * 9 + [2] * 2, [4] * 10 + [7] * 6])
    comes_back = masks.documents([0] * 5 + [1] * 9 + [0] * 2)
    expected = {id(m): masks.Mask._structure(m, 4, 3) for m in (runs, comes_back)}
    calls = evaluated
    calls.clear()
    assert torch.equal(runs.block_structure(4, 3), expected[id(runs)]) and calls == []
    assert torch.equal(comes_back.block_structure(4, 3), expected[id(comes_back)]) and calls
