"""jaxpo.models."""
