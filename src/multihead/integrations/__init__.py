"""Bridges to other libraries; each module imports its library only when used.

`huggingface`: `multihead.attention` as a transformers attention implementation.
"""
