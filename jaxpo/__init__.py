"""jaxpo: JAX-native preference optimization for causal language models."""

__version__ = "0.1.0"
