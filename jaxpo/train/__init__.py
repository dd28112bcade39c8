"""jaxpo.train: configuration, optimiser, train state and step, the loop, checkpoints, metrics.

    python -m jaxpo.train --config=configs/dpo_tiny.py --workdir=runs/dpo   # = `jaxpo train`
"""

from jaxpo.train.config import Config, load_config

__all__ = ["Config", "load_config"]
