"""`make demo`: the shipped English → French model, scored, translating, and looked at.

Loads the shipped model (`multihead.apps.shipped`), scores it on the test split with sacrebleu
(corpus BLEU and chrF against all references of each sentence), translates a handful of
sentences, and writes the per-head attention of one sentence (encoder self-attention,
decoder self-attention, cross-attention) as PNG heatmaps.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...models import Seq2SeqTransformer
from ...viz import capture_attention, plot_alignment, plot_heads, views_from_capture
from ..shipped import shipped_model
from .data import load_splits, load_tokenizer
from .evaluate import evaluate_pairs, translate

MODEL_DIR = shipped_model("translate-en-fr")
EXAMPLES = [
    "Where is the station?",
    "I don't like cold coffee.",
    "She has three brothers.",
    "We will leave tomorrow morning.",
    "Can you help me, please?",
    "The cat is sleeping on the bed.",
]
PICTURED = "The cat is sleeping on the bed."


def load(model_dir: Path = MODEL_DIR):
    """The model and its tokenizer; a clear error when the model is not there."""
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no translation model in {model_dir}/: pass --model DIR, or train one with "
            "`make train-translate`"
        )
    model = Seq2SeqTransformer.from_pretrained(model_dir)
    tokenizer = model_dir / "spm.model"
    sp = load_tokenizer(tokenizer) if tokenizer.is_file() else load_tokenizer()
    if sp.get_piece_size() != model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {sp.get_piece_size()} pieces but the model in {model_dir}/ has "
            f"a vocabulary of {model.config.vocab_size}: put its own spm.model beside it"
        )
    return model, sp


def write_heatmaps(
    model: Seq2SeqTransformer, sp, sentence: str, out_dir: Path, *, beam_size: int = 5
) -> list[Path]:
    """Per-head heatmaps of the last layer of each attention kind, and the alignment."""
    config = model.config
    source = sp.encode(sentence)[: config.max_len - 1] + [config.eos_id]
    src_ids = torch.tensor([source])
    output = model.generate(src_ids, beam_size=beam_size, max_new_tokens=2 * len(source) + 10)[0]
    with torch.no_grad(), capture_attention(model) as captured:
        model(src_ids, torch.tensor([[config.bos_id, *output]]))
    pieces = [sp.id_to_piece(i) for i in output]
    views = views_from_capture(
        captured,
        ["<s>", *pieces],
        source_tokens=[sp.id_to_piece(i) for i in source],
        output_tokens=[*pieces, "</s>"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for prefix, kind, title in (
        ("encoder.", "self", "encoder self-attention"),
        ("decoder.", "self", "decoder self-attention"),
        ("decoder.", "cross", "cross-attention"),
    ):
        names = [n for n, v in views.items() if n.startswith(prefix) and v.kind == kind]
        if not names:
            continue
        path = out_dir / f"{title.replace(' ', '-')}.png"
        plot_heads(views[names[-1]], title=f"{title}, {names[-1]}", path=path)
        written.append(path)
    cross = [view for view in views.values() if view.kind == "cross"]
    if cross:
        path = out_dir / "alignment.png"
        plot_alignment(cross[-1], title="cross-attention, last layer, mean of heads", path=path)
        written.append(path)
    return written


def run(
    model_dir: Path = MODEL_DIR,
    out_dir: Path = Path("runs/demo"),
    *,
    test_sentences: int | None = None,
    beam_size: int = 5,
) -> dict[str, float]:
    model, sp = load(model_dir)
    config = model.config
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"English → French Transformer from {model_dir}/: {params:.1f}M parameters, "
        f"d_model {config.d_model}, {config.num_heads} heads, "
        f"{config.num_encoder_layers}+{config.num_decoder_layers} layers"
    )
    splits = load_splits()
    tick = time.monotonic()
    scores, _ = evaluate_pairs(model, sp, splits.test, limit=test_sentences, beam_size=beam_size)
    print(
        f"test: BLEU {scores.bleu:.1f}, chrF {scores.chrf:.1f} on {scores.sentences} sentences "
        f"(beam {beam_size}, {time.monotonic() - tick:.0f} s; sacrebleu {scores.bleu_signature})"
    )
    print("\nTranslations:")
    french = translate(model, sp, EXAMPLES, beam_size=beam_size)
    for english, translation in zip(EXAMPLES, french, strict=True):
        print(f"  {english:<36} → {translation}")
    written = write_heatmaps(model, sp, PICTURED, out_dir, beam_size=beam_size)
    print(f'\nAttention of "{PICTURED}", one panel per head (and their mean):')
    for path in written:
        print(f"  {path}")
    return {"bleu": scores.bleu, "chrf": scores.chrf, "sentences": scores.sentences}
