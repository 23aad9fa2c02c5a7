"""Speech recognition of spoken digit strings: FSDD, log-mel, a Transformer encoder and CTC.

Modules: `data` (recordings, splits, synthesised utterances), `features` (log-mel),
`augment` (speed, VTLP, noise, SpecAugment), `espeak` and `flite` (synthetic
speakers), `decode` (CTC greedy and prefix beam search), `evaluate` (WER), `train`
(``main(argv)``), `loso` (the leave-one-speaker-out table).
"""
