"""jaxpo.data."""
