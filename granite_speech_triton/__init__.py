"""Granite Speech 4.1 (AR and NAR) on NVIDIA Triton.

`granite_speech_triton.model` holds the plain-PyTorch model code and weight loading;
`granite_speech_triton.serving` holds the Triton glue (adapters' helpers, repository rendering,
server launcher). Model code never imports Triton.
"""

__version__ = "0.1.0"
