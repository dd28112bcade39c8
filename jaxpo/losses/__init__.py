"""jaxpo.losses: preference-optimisation objectives as pure JAX functions, and their registry.

Every loss takes log-probabilities (arrays of any leading shape) and returns the per-example
loss; hyperparameters are keyword-only with the paper's defaults. See ``docs/losses.md``.
The trainer reaches them through :func:`get`, which returns an :class:`Objective`.
"""

# One import per line (optax style); ruff's isort would merge them.
# ruff: noqa: I001
from jaxpo.losses import _catalogue  # noqa: F401  (registers every objective)
from jaxpo.losses._auxiliary import sft
from jaxpo.losses._build import MODIFIERS
from jaxpo.losses._build import build
from jaxpo.losses._build import metrics_beta
from jaxpo.losses._listwise import infonca
from jaxpo.losses._listwise import lipo_lambda
from jaxpo.losses._listwise import list_mle
from jaxpo.losses._listwise import listnet
from jaxpo.losses._listwise import pairwise_logistic
from jaxpo.losses._listwise import pro
from jaxpo.losses._metrics import preference_metrics
from jaxpo.losses._metrics import reward_metrics
from jaxpo.losses._modifiers import ld_logps
from jaxpo.losses._modifiers import wpo_weights
from jaxpo.losses._pairwise import apo_down
from jaxpo.losses._pairwise import apo_zero
from jaxpo.losses._pairwise import bco
from jaxpo.losses._pairwise import dpo
from jaxpo.losses._pairwise import dpop
from jaxpo.losses._pairwise import exo
from jaxpo.losses._pairwise import hinge
from jaxpo.losses._pairwise import ipo
from jaxpo.losses._pairwise import modpo
from jaxpo.losses._pairwise import nca
from jaxpo.losses._pairwise import robust_dpo
from jaxpo.losses._pairwise import sppo_hard
from jaxpo.losses._reference_free import cpo
from jaxpo.losses._reference_free import orpo
from jaxpo.losses._reference_free import simpo
from jaxpo.losses._reference_free import triple_po
from jaxpo.losses._registry import NEEDS
from jaxpo.losses._registry import LossInputs
from jaxpo.losses._registry import Objective
from jaxpo.losses._registry import combine
from jaxpo.losses._registry import get
from jaxpo.losses._registry import names
from jaxpo.losses._registry import with_ld
from jaxpo.losses._registry import with_wpo
from jaxpo.losses._reward import bradley_terry
from jaxpo.losses._reward import plackett_luce
from jaxpo.losses._token import sparse_po
from jaxpo.losses._token import tdpo
from jaxpo.losses._tree import tpo
from jaxpo.losses._unpaired import kto

__all__ = [
    "MODIFIERS",
    "NEEDS",
    "LossInputs",
    "Objective",
    "apo_down",
    "apo_zero",
    "bco",
    "bradley_terry",
    "build",
    "combine",
    "cpo",
    "dpo",
    "dpop",
    "exo",
    "get",
    "hinge",
    "infonca",
    "ipo",
    "kto",
    "ld_logps",
    "lipo_lambda",
    "list_mle",
    "listnet",
    "metrics_beta",
    "modpo",
    "names",
    "nca",
    "orpo",
    "pairwise_logistic",
    "plackett_luce",
    "preference_metrics",
    "pro",
    "reward_metrics",
    "robust_dpo",
    "sft",
    "simpo",
    "sparse_po",
    "sppo_hard",
    "tdpo",
    "tpo",
    "triple_po",
    "with_ld",
    "with_wpo",
    "wpo_weights",
]
