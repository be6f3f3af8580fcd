"""optax_depthnorm: depth-aware gradient transformations for Optax."""

from optax_depthnorm import linen, nnx
from optax_depthnorm._bgn import bgn, with_bgn
from optax_depthnorm._decay import DepthDecayState, depth_decay, depth_normalized
from optax_depthnorm._depths import (
  NOT_A_LAYER,
  DepthOrderWarning,
  StackedDepth,
  layer_depths,
)
from optax_depthnorm._diagnose import Flag, diagnose
from optax_depthnorm._infer import UnusedParamWarning, infer_depths
from optax_depthnorm._normalize import LayerwiseNormalizeState, layerwise_normalize
from optax_depthnorm._plot import flow_heatmap_image, plot_flow_heatmap, plot_gradient_flow
from optax_depthnorm._report import FlowReport, gradient_flow
from optax_depthnorm._scale import ScaleNormalizeState, scale_normalize
from optax_depthnorm._table import depth_table
from optax_depthnorm._track import (
  FlowStats,
  GradientFlowState,
  flow_from_state,
  track_gradient_flow,
)
from optax_depthnorm.linen import BGN, activation_gradient_norms

__version__ = "0.1.0"

__all__ = (
  "BGN",
  "NOT_A_LAYER",
  "DepthDecayState",
  "DepthOrderWarning",
  "Flag",
  "FlowReport",
  "FlowStats",
  "GradientFlowState",
  "LayerwiseNormalizeState",
  "ScaleNormalizeState",
  "StackedDepth",
  "UnusedParamWarning",
  "activation_gradient_norms",
  "bgn",
  "depth_decay",
  "depth_normalized",
  "depth_table",
  "diagnose",
  "flow_from_state",
  "flow_heatmap_image",
  "gradient_flow",
  "infer_depths",
  "layer_depths",
  "layerwise_normalize",
  "linen",
  "nnx",
  "plot_flow_heatmap",
  "plot_gradient_flow",
  "scale_normalize",
  "track_gradient_flow",
  "with_bgn",
)
