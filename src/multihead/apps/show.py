"""``multihead show``: write the attention viewer (HTML) and PNGs for a model or saved weights.

The command lives beside the applications because it loads their models and data; `viz`
below it only draws, captures and writes what it is given.

    multihead show translation "The cat sleeps."   the shipped English → French model
    multihead show image 7                         the digits ViT on test image 7
    multihead show weights.safetensors             weights you saved (format: viz/views.py)

Mistakes (a missing model, a bad index) raise ValueError / FileNotFoundError, which the main
CLI reports in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from ..models import Seq2SeqTransformer, ViT
from ..viz import (
    AttentionView,
    capture_attention,
    image_rollout,
    load_attention,
    plot_alignment,
    plot_heads,
    plot_rollout_overlay,
    views_from_capture,
    write_html,
)
from .limits import BEAM
from .shipped import shipped_model

__all__ = ["add_show_command", "run_show", "show_image", "show_translation", "show_weights"]

TRANSLATION_MODEL = shipped_model("translate-en-fr")
IMAGE_MODEL = shipped_model("image-digits")


def add_show_command(subparsers: Any) -> None:
    """Add ``show`` to the main CLI's subcommands."""
    show = subparsers.add_parser(
        "show",
        help="see where attention looks: an HTML viewer and PNGs",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    show.add_argument("what", metavar="WHAT", help="'translation', 'image' or FILE.safetensors")
    show.add_argument(
        "argument", nargs="?", help="the English sentence (translation) or test image index (image)"
    )
    show.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    show.add_argument("--tokenizer", type=Path, help="sentencepiece model (default: the model's)")
    show.add_argument("--out", type=Path, default=Path("runs/show"), help="output directory")
    show.add_argument(
        "--layer", type=int, help="decoder layer for the alignment (default: mean of all)"
    )
    show.add_argument("--beam", type=BEAM, default=5, help="beam size for the translation")
    show.set_defaults(run=run_show)


def run_show(args: argparse.Namespace) -> int:
    if args.what == "translation":
        if not args.argument or not args.argument.strip():
            raise ValueError('give the sentence to translate: multihead show translation "..."')
        try:
            args.argument.encode("utf-8")  # bytes that were not UTF-8 come as lone surrogates
        except UnicodeEncodeError:
            raise ValueError("the sentence is not valid UTF-8 text") from None
        show_translation(args.argument, args)
    elif args.what == "image":
        if args.argument is None or not re.fullmatch(r"\d+", args.argument):
            raise ValueError(f"give a test image index (0, 1, ...), got {args.argument!r}")
        show_image(int(args.argument), args)
    else:
        path = Path(args.what)
        if not path.is_file():
            raise FileNotFoundError(
                f"{args.what} is not 'translation', 'image' or an existing .safetensors file"
            )
        if args.argument is not None:
            raise ValueError(f"show FILE takes no further argument, got {args.argument!r}")
        show_weights(path, args.out)
    return 0


def _say(message: str) -> None:
    print(message, flush=True)


def _short(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


def _missing_model(directory: Path, what: str, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"no {what} in {directory}/ ({how}; or pass --model DIR)")


# -- saved weights -------------------------------------------------------------------------------


def show_weights(path: Path, out: Path) -> list[Path]:
    """The viewer and a heads grid per layer for weights saved with `save_attention`."""
    _say(f"reading {path}")
    views = load_attention(path)
    page = write_html(out / f"{path.stem}.html", views, title=f"attention: {path.name}")
    written = [page]
    _say(f"wrote {page}  ({len(views)} layers)")
    for name, view in views.items():
        png = out / f"{path.stem}-{_slug(name)}.png"
        plot_heads(view, title=name, path=png)
        written.append(png)
        _say(f"wrote {png}")
    return written


# -- translation ---------------------------------------------------------------------------------


def _load_translation(args: argparse.Namespace) -> tuple[Seq2SeqTransformer, Any]:
    directory = args.model or TRANSLATION_MODEL
    if not (directory / "config.json").is_file():
        raise _missing_model(
            directory, "translation model", "train it: python -m multihead.apps.translate.train"
        )
    tokenizer = args.tokenizer or directory / "spm.model"
    try:
        from .translate.data import SPM_MODEL, load_tokenizer
    except ImportError as error:
        raise ValueError(
            f"the translation app needs {error.name}: pip install -e '.[apps]'"
        ) from None
    if args.tokenizer is None and not tokenizer.is_file():
        tokenizer = SPM_MODEL
    _say(f"loading the translation model from {directory}/ and tokenizer {tokenizer}")
    model = Seq2SeqTransformer.from_pretrained(directory)
    sp = load_tokenizer(tokenizer)
    if sp.get_piece_size() != model.config.vocab_size:
        raise ValueError(
            f"{tokenizer} has {sp.get_piece_size()} pieces but the model's vocab_size is "
            f"{model.config.vocab_size}: pass the model's tokenizer with --tokenizer"
        )
    return model, sp


def show_translation(sentence: str, args: argparse.Namespace) -> list[Path]:
    """Translate ``sentence``, then record every layer in one teacher-forced pass over the
    translation (exact weights for each output position, unlike mixing beam-search steps)."""
    model, sp = _load_translation(args)
    c = model.config
    if args.layer is not None and not 0 <= args.layer < c.num_decoder_layers:
        raise ValueError(f"--layer must be in [0, {c.num_decoder_layers}), got {args.layer}")
    src = sp.encode(sentence)[: c.max_len - 1] + [c.eos_id]
    src_ids = torch.tensor([src])
    out = model.generate(src_ids, beam_size=max(1, args.beam), max_new_tokens=2 * len(src) + 10)[0]
    out = out[: c.max_len - 1]
    translation = sp.decode(out)
    _say(f"{sentence}  →  {translation}")
    tgt_in = torch.tensor([[c.bos_id, *out]])
    with torch.no_grad(), capture_attention(model) as captured:
        model(src_ids, tgt_in)
    pieces = [sp.id_to_piece(i) for i in out]
    source = [sp.id_to_piece(i) for i in src]
    views = views_from_capture(
        captured, ["<s>", *pieces], source_tokens=source, output_tokens=[*pieces, "</s>"]
    )
    cross = [name for name, view in views.items() if view.kind == "cross"]
    if args.layer is None:
        weights = torch.stack([views[name].weights.mean(0) for name in cross]).mean(0)
        which = f"mean of {len(cross)} layers × {c.num_heads} heads"
        head_layer = cross[-1]
    else:
        head_layer = cross[args.layer]
        weights, which = views[head_layer].weights, f"{head_layer}, mean of {c.num_heads} heads"
    alignment = AttentionView(weights, [*pieces, "</s>"], source, "cross")
    out_dir: Path = args.out
    page = write_html(out_dir / "translation.html", views, title=f"{sentence} → {translation}")
    aligned = out_dir / "translation-alignment.png"
    plot_alignment(alignment, title=_short(f"cross-attention ({which})"), path=aligned)
    heads = out_dir / "translation-heads.png"
    plot_heads(views[head_layer], title=_short(f"{head_layer}: {translation}"), path=heads)
    for path in (page, aligned, heads):
        _say(f"wrote {path}")
    return [page, aligned, heads]


# -- image ---------------------------------------------------------------------------------------


def show_image(index: int, args: argparse.Namespace) -> list[Path]:
    """Classify test image ``index`` of the digits app's split; the class token's rollout over
    the patches shows which pixels the decision drew on."""
    directory = args.model or IMAGE_MODEL
    if not (directory / "config.json").is_file():
        raise _missing_model(directory, "image model", "train it: python -m multihead.apps.image")
    try:
        from .image import load_split
    except ImportError as error:
        raise ValueError(f"the image app needs {error.name}: pip install -e '.[apps]'") from None
    _say(f"loading the image model from {directory}/ and the digits test split")
    model = ViT.from_pretrained(directory)
    split = load_split()
    if not 0 <= index < len(split.test_labels):
        raise ValueError(f"image index must be in [0, {len(split.test_labels)}), got {index}")
    image, label = split.test_images[index], int(split.test_labels[index])
    with torch.no_grad(), capture_attention(model) as captured:
        predicted = int(model(image[None]).argmax(-1))
    side = model.config.image_size // model.config.patch_size
    grid = (side, side)
    tokens = ["[class]"] + [f"r{r}c{c}" for r in range(side) for c in range(side)]
    views = views_from_capture(captured, tokens)
    names = list(views)
    _say(f"test image {index}: label {label}, predicted {predicted}")
    heat = image_rollout([captured[name] for name in names], grid)[0]
    out: Path = args.out
    verdict = f"test image {index}: label {label}, predicted {predicted}"
    page = write_html(out / f"image-{index}.html", views, title=verdict)
    overlay = out / f"image-{index}-rollout.png"
    plot_rollout_overlay(image, heat, title=f"{verdict} · rollout of {len(names)} layers",
                         path=overlay)  # fmt: skip
    heads = out / f"image-{index}-heads.png"
    plot_heads(views[names[-1]], title=f"{names[-1]} ({verdict})", path=heads)
    for path in (page, overlay, heads):
        _say(f"wrote {path}")
    return [page, overlay, heads]
