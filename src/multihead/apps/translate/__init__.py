"""English → French translation: Tatoeba data, sentencepiece, training, BLEU/chrF evaluation.

``data`` (pairs, splits by English sentence, vocabulary, length buckets), ``evaluate``
(translate and score against all references), ``train`` (the training script).
"""
