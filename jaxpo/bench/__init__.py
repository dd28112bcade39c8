"""Benchmarks that train and measure: ``jaxpo bench quality`` (:mod:`jaxpo.bench.quality`)."""
