"""hotmerge: evolutionary model-merge search with resident models."""

__version__ = "0.1.0"
