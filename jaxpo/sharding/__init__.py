"""jaxpo.sharding."""
