"""optax_depthnorm: depth-aware gradient transformations for Optax."""

from optax_depthnorm import nnx
from optax_depthnorm._bgn import BGN, bgn, with_bgn
from optax_depthnorm._decay import DepthDecayState, depth_decay, depth_normalized
from optax_depthnorm._depths import DepthOrderWarning, depth_table, layer_depths
from optax_depthnorm._normalize import layerwise_normalize

__version__ = "0.1.0"

__all__ = (
  "BGN",
  "DepthDecayState",
  "DepthOrderWarning",
  "bgn",
  "depth_decay",
  "depth_normalized",
  "depth_table",
  "layer_depths",
  "layerwise_normalize",
  "nnx",
  "with_bgn",
)
