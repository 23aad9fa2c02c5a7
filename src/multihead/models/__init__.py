"""Models built from the library's layers, saved as safetensors + JSON config."""

from .base import PretrainedMixin
from .convolution_module import ConvolutionModule
from .lm import LMConfig, TransformerLM
from .seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from .speech import SpeechEncoder, SpeechEncoderConfig
from .vit import ViT, ViTConfig

__all__ = ["LMConfig", "PretrainedMixin", "Seq2SeqConfig", "Seq2SeqTransformer", "TransformerLM"]
__all__ += ["ConvolutionModule", "SpeechEncoder", "SpeechEncoderConfig"]
__all__ += ["ViT", "ViTConfig"]
