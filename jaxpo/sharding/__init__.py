"""jaxpo.sharding: the device mesh, logical-axis rules, and multi-process start-up.

Models name axes logically (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``vocab``, ``batch``,
``length``); the rules map those names to the mesh axes ``("data", "fsdp", "tensor")``.
"""

from jaxpo.sharding.distributed import make_global_batch as make_global_batch
from jaxpo.sharding.distributed import maybe_initialize as maybe_initialize
from jaxpo.sharding.logical import constrain as constrain
from jaxpo.sharding.logical import logical_to_spec as logical_to_spec
from jaxpo.sharding.logical import use_rules as use_rules
from jaxpo.sharding.mesh import MESH_AXES as MESH_AXES
from jaxpo.sharding.mesh import make_mesh as make_mesh
from jaxpo.sharding.rules import PRESETS as PRESETS
from jaxpo.sharding.rules import batch_shardings as batch_shardings
from jaxpo.sharding.rules import get_rules as get_rules
from jaxpo.sharding.rules import named_sharding as named_sharding
from jaxpo.sharding.rules import param_shardings as param_shardings
from jaxpo.sharding.rules import state_shardings as state_shardings
