"""jaxpo.train."""
