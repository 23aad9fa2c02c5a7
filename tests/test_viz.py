"""multihead.viz: capture, rollout, plots, the HTML viewer (in a real headless Chromium), and
``multihead show``."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import multihead.functional as functional
from multihead import masks
from multihead.cli import main
from multihead.models import Seq2SeqConfig, Seq2SeqTransformer
from multihead.multi_head_attention import MultiHeadAttention
from multihead.viz import (
    AttentionView,
    capture_attention,
    image_rollout,
    load_attention,
    render_html,
    rollout,
    save_attention,
    views_from_capture,
    write_html,
)

REPO = Path(__file__).resolve().parents[1]
SPM_MODEL = REPO / "data" / "translate" / "spm.model"
NEEDS_MATPLOTLIB = "needs matplotlib: pip install -e '.[dev]' (make setup installs it)"
NEEDS_APPS = "needs the apps extra: pip install -e '.[apps]' (make setup installs it)"


def tiny_seq2seq(vocab_size: int = 40, seed: int = 0, **sizes: int) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    config = {"d_model": 16, "num_heads": 4, "num_encoder_layers": 2, "num_decoder_layers": 2}
    config.update({"dim_feedforward": 32, "max_len": 24, **sizes})
    return Seq2SeqTransformer(Seq2SeqConfig(vocab_size=vocab_size, **config)).eval()


def random_ids(batch: int, length: int, vocab: int = 40) -> Tensor:
    return torch.randint(3, vocab, (batch, length))


# -- capture -------------------------------------------------------------------------------------


def test_capture_equals_each_layer_called_with_per_head_weights() -> None:
    model = tiny_seq2seq()
    src, tgt = random_ids(2, 7), random_ids(2, 5)
    src[1, 5:] = 0  # padding: masks reach the recorded weights
    calls: dict[str, tuple[tuple, dict]] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: calls.__setitem__(name, (args, kwargs)),
            with_kwargs=True,
        )
        for name, module in model.named_modules()
        if isinstance(module, MultiHeadAttention)
    ]
    with torch.no_grad(), capture_attention(model) as captured:
        logits = model(src, tgt)
    for hook in hooks:
        hook.remove()

    assert list(captured) == list(calls)
    assert len(captured) == 2 + 2 * 2
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (args, kwargs) in calls.items():
            _, expected = modules[name](*args, **kwargs, need_weights="per_head")
            torch.testing.assert_close(captured[name], expected, rtol=0, atol=0)
            assert captured[name].shape[:2] == (2, 4)
        torch.testing.assert_close(model(src, tgt), logits, rtol=1e-5, atol=1e-5)
    assert captured["decoder.layers.0.cross_attn"].shape == (2, 4, 5, 7)
    assert float(captured["encoder.layers.0.self_attn"][1, :, :, 5:].abs().max()) == 0.0


def test_capture_keeps_the_kernels_and_computes_weights_beside(monkeypatch) -> None:
    chosen: list[tuple[str, bool]] = []
    select = functional.select_kernel

    def spy(request, kernel="auto"):
        module = select(request, kernel)
        chosen.append((module.NAME, request.return_weights))
        return module

    monkeypatch.setattr(functional, "select_kernel", spy)
    model = tiny_seq2seq()
    src, tgt = random_ids(1, 6), random_ids(1, 4)
    with torch.no_grad():
        model(src, tgt)
        outside_before = chosen[:]
        chosen.clear()
        with capture_attention(model):
            model(src, tgt)
        inside = chosen[:]
        chosen.clear()
        model(src, tgt)
    assert len(outside_before) == len(chosen) == 6
    assert all(kernel == "sdpa" and not weights for kernel, weights in outside_before + chosen)
    # Inside: each layer's output from the same kernel, then its weights by the reference one.
    assert inside[0::2] == outside_before
    assert inside[1::2] == [("reference", True)] * 6


@pytest.mark.parametrize(
    ("kernel", "length", "positions"),
    [("sdpa", 9, None), ("sdpa", 9, "relative"), ("tiled", 64, "alibi"), ("tiled", 64, None)],
)
def test_capture_leaves_the_output_bitwise_equal(kernel, length, positions, monkeypatch) -> None:
    from multihead.kernels import tiled

    monkeypatch.setattr(tiled, "PREFER_MIN_KEYS", 64)  # block skipping from 64 keys (tests' tiles)
    torch.manual_seed(0)
    layer = MultiHeadAttention(8, 2, positions=positions).eval()
    x = torch.randn(1, length, 8)
    band = masks.sliding_window(length, length, window=6) & masks.padding(
        [length - 2], max_len=length
    )
    chosen: list[str] = []
    select = functional.select_kernel

    def spy(request, kernel="auto"):
        module = select(request, kernel)
        chosen.append(module.NAME)
        return module

    monkeypatch.setattr(functional, "select_kernel", spy)
    with torch.no_grad():
        plain = layer(x, mask=band)
        assert chosen == [kernel]
        with capture_attention(layer) as captured:
            recorded = layer(x, mask=band)
        assert chosen == [kernel, kernel, "reference"]
        _, weights = layer(x, mask=band, need_weights="per_head")
    assert torch.equal(recorded, plain)
    assert torch.equal(captured[""], weights)  # what the reference kernel gives the caller
    assert captured[""].shape == (1, 2, length, length)


def test_capture_of_cached_decoding_equals_one_teacher_forced_pass() -> None:
    model = tiny_seq2seq(seed=1)
    src = random_ids(1, 6)
    with capture_attention(model) as stepwise:
        out = model.generate(src, max_new_tokens=6)[0]
    calls = len(stepwise.calls["decoder.layers.0.self_attn"])
    fed = torch.tensor([[model.config.bos_id, *out][:calls]])
    with torch.no_grad(), capture_attention(model) as full:
        model(src, fed)
    for name in full:
        torch.testing.assert_close(stepwise[name], full[name], rtol=1e-5, atol=1e-6)
    joined = stepwise["decoder.layers.1.self_attn"]
    assert joined.shape == (1, 4, calls, calls)
    assert torch.equal(joined, joined.tril())


def test_capture_refuses_a_model_without_attention() -> None:
    with (
        pytest.raises(ValueError, match="no MultiHeadAttention"),
        capture_attention(torch.nn.Linear(2, 2)),
    ):
        pass


# -- rollout ---------------------------------------------------------------------------------------


def test_rollout_equals_hand_computation() -> None:
    # Layer 1: both heads [[1, 0], [.5, .5]] → A1 = .5·I + .5·W = [[1, 0], [.25, .75]].
    # Layer 2: heads [[0, 1], [0, 1]] and [[1, 0], [1, 0]], mean .5 everywhere
    #          → A2 = [[.75, .25], [.25, .75]].
    # R = A2 · A1 = [[.75 + .0625, .1875], [.25 + .1875, .5625]].
    layer1 = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.5, 0.5]]])
    layer2 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    expected = torch.tensor([[0.8125, 0.1875], [0.4375, 0.5625]])
    torch.testing.assert_close(rollout([layer1, layer2]), expected)
    torch.testing.assert_close(rollout([layer1[None], layer2[None]]), expected[None])  # batch
    # Without the residual it is the plain product of the head means:
    # [[.5, .5], [.5, .5]] · [[1, 0], [.5, .5]] = [[.75, .25], [.75, .25]].
    torch.testing.assert_close(
        rollout([layer1, layer2], residual=0.0), torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    )
    # max over heads: layer 2 is all ones, .5·I + .5·ones = [[1, .5], [.5, 1]], re-normalised
    # to [[2/3, 1/3], [1/3, 2/3]]; R = [[2/3 + 1/12, 1/4], [1/3 + 1/6, 1/2]].
    by_max = rollout([layer1, layer2], head_fusion="max")
    torch.testing.assert_close(by_max, torch.tensor([[0.75, 0.25], [0.5, 0.5]]))


def test_rollout_keeps_a_fully_masked_row_on_itself_and_checks_input() -> None:
    weights = torch.tensor([[[0.0, 0.0], [0.5, 0.5]]])  # query 0 sees nothing
    torch.testing.assert_close(rollout([weights])[0], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="non-empty"):
        rollout([])
    with pytest.raises(ValueError, match="square"):
        rollout([torch.rand(2, 3, 4)])
    with pytest.raises(ValueError, match="layer 1 has 4 tokens but the layers before have 3"):
        rollout([torch.rand(2, 3, 3), torch.rand(2, 4, 4)])


def test_image_rollout_is_the_class_token_row_over_the_patch_grid() -> None:
    generator = torch.Generator().manual_seed(0)
    layers = [torch.softmax(torch.randn(1, 2, 5, 5, generator=generator), -1) for _ in range(3)]
    grid = image_rollout(layers, (2, 2))
    assert grid.shape == (1, 2, 2)
    full = rollout(layers)[0, 0, 1:]
    torch.testing.assert_close(grid[0].flatten(), full / full.max())


# -- plots ---------------------------------------------------------------------------------------


def test_plot_heads_writes_a_png_with_a_panel_per_head_and_the_mean(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason=NEEDS_MATPLOTLIB)
    from multihead.viz import plot_heads

    tokens = [f"tok{i}" for i in range(12)]  # the README's 8 heads × 40 tokens take ~10 s
    weights = torch.softmax(torch.randn(8, 12, 12, generator=torch.Generator().manual_seed(0)), -1)
    figure = plot_heads(weights, tokens, tokens, title="8 heads", path=tmp_path / "heads.png")
    panels = [ax for ax in figure.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(panels) == 9  # 8 heads + mean, a 3×3 grid with no empty cell
    assert [t.get_text() for t in panels[4].get_yticklabels()] == tokens
    assert [t.get_text() for t in panels[4].get_xticklabels()] == tokens
    np.testing.assert_allclose(panels[8].images[0].get_array(), weights.mean(0).numpy(), 1e-6)
    assert (tmp_path / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_heads(weights[:2, :5, :7], path=tmp_path / "heads.svg")
    assert "<svg" in (tmp_path / "heads.svg").read_text()[:500]


def test_alignment_and_rollout_overlay_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason=NEEDS_MATPLOTLIB)
    from multihead.viz import plot_alignment, plot_rollout_overlay

    generator = torch.Generator().manual_seed(0)
    weights = torch.softmax(torch.randn(4, 3, 5, generator=generator), -1)  # heads, target, source
    source, target = ["a", "b", "c", "d", "</s>"], ["x", "y", "</s>"]
    figure = plot_alignment(weights, source, target, path=tmp_path / "align.png")
    matrix = figure.axes[0]
    assert [t.get_text() for t in matrix.get_xticklabels()] == source
    assert [t.get_text() for t in matrix.get_yticklabels()] == target
    # One matrix: the heads' mean, target rows by source columns.
    np.testing.assert_allclose(matrix.images[0].get_array(), weights.mean(0).numpy(), 1e-6)

    image = torch.rand(1, 8, 8, generator=generator)
    heat = torch.rand(2, 2, generator=generator)
    figure = plot_rollout_overlay(image, heat, path=tmp_path / "overlay.png")
    shown, rolled, overlay = figure.axes[:3]
    stretched = ((image[0] - image.min()) / (image.max() - image.min())).numpy()  # to [0, 1]
    np.testing.assert_allclose(shown.images[0].get_array(), stretched, 1e-6)
    np.testing.assert_allclose(rolled.images[0].get_array(), heat.numpy(), 1e-6)
    pixels, over = overlay.images
    np.testing.assert_allclose(pixels.get_array(), stretched, 1e-6)
    np.testing.assert_allclose(over.get_array(), heat.numpy(), 1e-6)
    # The 2×2 map stretched over the 8×8 pixels: each patch over its 4×4 pixels.
    assert list(over.get_extent()) == list(rolled.images[0].get_extent()) == [-0.5, 7.5, 7.5, -0.5]
    for name in ("align.png", "overlay.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- views and the saved-weights format ----------------------------------------------------------


def test_save_and_load_attention_round_trip(tmp_path: Path) -> None:
    layers = {
        "enc.1": AttentionView(torch.rand(2, 3, 3), ["a", "b", "c"]),
        "enc.10": torch.rand(2, 3, 3),
        "dec.cross": AttentionView(torch.rand(1, 2, 4, 3), list("wxyz"), list("abc"), "cross"),
    }
    path = save_attention(tmp_path / "w.safetensors", layers, tokens=["a", "b", "c"])
    loaded = load_attention(path)
    assert list(loaded) == ["enc.1", "enc.10", "dec.cross"]
    assert loaded["dec.cross"].kind == "cross"
    assert loaded["dec.cross"].query_tokens == list("wxyz")
    assert loaded["enc.10"].key_tokens == ["a", "b", "c"]
    torch.testing.assert_close(loaded["dec.cross"].weights, layers["dec.cross"].weights)


def test_load_attention_reads_a_plain_file_in_natural_order(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    tensors = {
        "layer10": torch.rand(2, 3, 3),
        "layer2": torch.rand(3, 3),
        "cross": torch.rand(3, 4),
    }
    save_file(tensors, str(path), metadata={"tokens": json.dumps(["x", "y", "z"])})
    loaded = load_attention(path)
    assert list(loaded) == ["cross", "layer2", "layer10"]
    assert loaded["layer2"].weights.shape == (1, 3, 3)
    assert loaded["layer2"].key_tokens == ["x", "y", "z"]
    assert loaded["cross"].kind == "cross"
    assert loaded["cross"].query_tokens == ["x", "y", "z"]
    assert loaded["cross"].key_tokens == ["0", "1", "2", "3"]  # no source_tokens: positions


def test_views_reject_mismatched_tokens_and_batches() -> None:
    with pytest.raises(ValueError, match="2 tokens but the weights have 3"):
        AttentionView(torch.rand(1, 3, 3), ["a", "b"])
    with pytest.raises(ValueError, match="pick one example"):
        AttentionView(torch.rand(2, 4, 3, 3))
    with pytest.raises(ValueError, match="source_tokens"):
        views_from_capture({"decoder.layers.0.cross_attn": torch.rand(1, 2, 3, 4)}, list("abc"))


# -- the HTML viewer in a real browser -----------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("needs Chromium: apt-get install chromium (make test installs it when run as root)")


def _run_chromium(tmp_path: Path, url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *flags,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Uncaught" not in result.stderr, result.stderr[-2000:]
    return result


class _DomReader(HTMLParser):
    """The attributes of <body>, of each matrix cell and of each key-token span."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.cells: list[dict[str, str]] = []
        self.keys: list[dict[str, str]] = []
        self._in_keys = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = found
        elif tag == "div" and found.get("class", "").split()[:1] == ["cell"]:
            self.cells.append(found)
        elif tag == "div" and found.get("id") == "keys":
            self._in_keys = True
        elif tag == "span" and self._in_keys and "data-k" in found:
            self.keys.append(found)

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":  # #keys holds only spans: its first </div> closes it
            self._in_keys = False


def _dom(tmp_path: Path, page: Path, fragment: str) -> _DomReader:
    result = _run_chromium(tmp_path, page.as_uri() + fragment, "--dump-dom")
    reader = _DomReader()
    reader.feed(result.stdout)
    assert reader.body.get("data-status") == "ok", reader.body
    assert "data-errors" not in reader.body, reader.body["data-errors"]
    return reader


def _cell_values(reader: _DomReader, rows: int, cols: int) -> np.ndarray:
    values = np.full((rows, cols), np.nan)
    for cell in reader.cells:
        values[int(cell["data-q"]), int(cell["data-k"])] = float(cell["data-w"])
    assert len(reader.cells) == rows * cols
    return values


@pytest.fixture(scope="module")
def viewer_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, AttentionView]]:
    torch.manual_seed(3)
    src, tgt = ["Le", "chat", "<dort>", "</s>"], ["<s>", "The", "cat", "sleeps", '"&']
    layers = {
        "encoder.0": AttentionView(torch.softmax(torch.randn(3, 4, 4), -1), src),
        "decoder.0.self": AttentionView(torch.softmax(torch.randn(3, 5, 5), -1).tril(), tgt),
        "decoder.0.cross": AttentionView(
            torch.softmax(torch.randn(3, 5, 4), -1), tgt, src, "cross"
        ),
    }
    page = write_html(tmp_path_factory.mktemp("viewer") / "page.html", layers, title="t </script>")
    return page, layers


def test_html_is_self_contained(viewer_page) -> None:
    page, _ = viewer_page
    text = page.read_text()
    assert "http://" not in text and "https://" not in text
    assert " src=" not in text and " href=" not in text  # no file, font or script is fetched
    assert text.count("</script>") == 3  # the title's "</script>" was escaped


def test_html_viewer_renders_the_selected_head_in_chromium(tmp_path: Path, viewer_page) -> None:
    page, layers = viewer_page
    reader = _dom(tmp_path, page, "")  # default: the first layer, head 0
    assert (reader.body["data-kind"], reader.body["data-layer"], reader.body["data-head"]) == (
        "self",
        "encoder.0",
        "0",
    )
    np.testing.assert_array_equal(_cell_values(reader, 4, 4), layers["encoder.0"].weights[0])

    reader = _dom(tmp_path, page, "#layer=decoder.0.cross&head=2&query=3")
    assert (reader.body["data-kind"], reader.body["data-head"]) == ("cross", "2")
    expected = layers["decoder.0.cross"].weights[2].numpy()
    np.testing.assert_array_equal(_cell_values(reader, 5, 4), expected)
    # The pinned query token's row, shown on the key tokens.
    assert reader.body["data-query"] == "3"
    shown = [float(span["data-w"]) for span in reader.keys]
    np.testing.assert_array_equal(shown, expected[3])

    reader = _dom(tmp_path, page, "#layer=decoder.0.self&head=mean")
    mean = layers["decoder.0.self"].weights.mean(0).numpy()
    np.testing.assert_allclose(_cell_values(reader, 5, 5), mean, rtol=1e-6, atol=1e-7)


def test_html_viewer_screenshot(tmp_path: Path, viewer_page) -> None:
    page, _ = viewer_page
    shot = tmp_path / "viewer.png"
    _run_chromium(
        tmp_path,
        page.as_uri() + "#layer=decoder.0.cross&head=1&query=2",
        "--hide-scrollbars",
        "--window-size=1100,700",
        f"--screenshot={shot}",
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_render_html_checks_layers() -> None:
    with pytest.raises(ValueError, match="non-empty mapping"):
        render_html({})


# -- multihead show ------------------------------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("multihead show: error: "), err
    assert match in err, err


def test_show_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing")
    _one_line_error(
        capsys, ["show", "translation", "Hello.", "--model", missing], "no translation model"
    )
    _one_line_error(capsys, ["show", "image", "3", "--model", missing], "no image model")
    _one_line_error(capsys, ["show", "image", "three"], "test image index")
    _one_line_error(capsys, ["show", "translation"], "sentence")
    _one_line_error(capsys, ["show", str(tmp_path / "nope.safetensors")], "not 'translation'")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    _one_line_error(
        capsys, ["show", str(tmp_path / "bad.safetensors")], "is not a safetensors file"
    )


def test_show_saved_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason=NEEDS_MATPLOTLIB)
    weights = {"layer0": torch.softmax(torch.randn(2, 3, 3), -1)}
    path = save_attention(tmp_path / "mine.safetensors", weights, tokens=["a", "b", "c"])
    assert main(["show", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'out' / 'mine.html'}" in out
    assert (tmp_path / "out" / "mine-layer0.png").is_file()


def test_show_translation_with_a_tiny_random_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib", reason=NEEDS_MATPLOTLIB)
    pytest.importorskip("sentencepiece", reason=NEEDS_APPS)
    if not SPM_MODEL.is_file():
        pytest.skip(f"needs {SPM_MODEL}: python -m multihead.apps.translate.data build-vocab")
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(SPM_MODEL)).get_piece_size()
    model = tiny_seq2seq(vocab_size=vocab, max_len=12)
    model.save_pretrained(tmp_path / "model")
    argv = ["show", "translation", "The cat sleeps.", "--model", str(tmp_path / "model")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--beam", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("translation.html", "translation-alignment.png", "translation-heads.png"):
        assert f"wrote {tmp_path / 'out' / name}" in out
    page = (tmp_path / "out" / "translation.html").read_text()
    assert "decoder.layers.1.cross_attn" in page and "▁cat" in page


def test_show_image_with_a_tiny_random_vit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib", reason=NEEDS_MATPLOTLIB)
    pytest.importorskip("sklearn", reason=NEEDS_APPS)
    from multihead.models.vit import ViT, ViTConfig

    torch.manual_seed(0)
    ViT(ViTConfig(d_model=8, num_heads=2, num_layers=2, dim_feedforward=16)).save_pretrained(
        tmp_path / "vit"
    )
    argv = ["show", "image", "5", "--model", str(tmp_path / "vit"), "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("image-5.html", "image-5-rollout.png", "image-5-heads.png"):
        assert f"wrote {tmp_path / name}" in out
    assert '"[class]"' in (tmp_path / "image-5.html").read_text()
    _one_line_error(capsys, [*argv[:2], "100000", *argv[3:]], "image index must be in [0, 360)")
