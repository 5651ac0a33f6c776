"""corral: a fleet manager for llama.cpp's llama-server."""

__version__ = "0.1.0"
