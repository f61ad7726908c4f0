"""tokenwire: a real-time streaming inference server for transformer language models."""

__version__ = "0.1.0"
