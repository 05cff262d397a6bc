"""Matrix views of leaves and the per-leaf plan of the MLorc transforms."""

from mlorc_optax._src.plan import DEFAULT_EXCLUDED_NAMES
from mlorc_optax._src.plan import IMPLEMENTATIONS
from mlorc_optax._src.plan import LeafPlan
from mlorc_optax._src.plan import LowRankPlan
from mlorc_optax._src.plan import MomentField
from mlorc_optax._src.plan import PlanNode
from mlorc_optax._src.inspection import compression_plan
from mlorc_optax._src.inspection import format_plan
from mlorc_optax._src.views import path_mask
from mlorc_optax._src.views import MatrixDimensionNumbers
from mlorc_optax._src.views import MatrixView

__all__ = (
    'DEFAULT_EXCLUDED_NAMES',
    'IMPLEMENTATIONS',
    'LeafPlan',
    'LowRankPlan',
    'MatrixDimensionNumbers',
    'MatrixView',
    'MomentField',
    'PlanNode',
    'compression_plan',
    'format_plan',
    'path_mask',
)
