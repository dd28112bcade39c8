"""Bundled tasks: a synthetic preference task with a programmatic true reward (no download)."""

from jaxpo.tasks import synthetic

__all__ = ["synthetic"]
