"""jaxpo.train: the train state, step and loop, checkpoints, metrics and reference caches.

Imports point one way: ``setup`` (a run from its config) builds on ``optim``, ``state``,
``checkpoint``, ``loss_inputs`` and ``step``; ``loop`` on ``setup``. The config itself is
:mod:`jaxpo.config`; the embedded demo is :mod:`jaxpo.demo`.

    summary = jaxpo.train.loop.train(config, workdir)   # = `jaxpo train --config=...`
"""
