"""elsa: a Hydra-configured framework for extreme LLM sparsity."""

__version__ = "0.1.0"
