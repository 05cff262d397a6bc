"""The wrapper :func:`mlorc_optax.low_rank_moments`: moment specs, fast steps."""

from mlorc_optax._src.fast_steps import AdamFastStep
from mlorc_optax._src.fast_steps import LionFastStep
from mlorc_optax._src.low_rank import COMPLEMENT_MODES
from mlorc_optax._src.low_rank import DEFAULT_MOMENTS
from mlorc_optax._src.low_rank import LowRankMomentsState
from mlorc_optax._src.low_rank import MomentSpec
from mlorc_optax._src.low_rank import low_rank_moments
from mlorc_optax._src.step_math import adam_update_bound
from mlorc_optax._src.step_math import complement_weight
from mlorc_optax._src.step_math import out_of_span
from mlorc_optax._src.step_math import span_norm_ratio

__all__ = (
    'adam_update_bound',
    'complement_weight',
    'out_of_span',
    'span_norm_ratio',
    'AdamFastStep',
    'LionFastStep',
    'COMPLEMENT_MODES',
    'DEFAULT_MOMENTS',
    'LowRankMomentsState',
    'MomentSpec',
    'low_rank_moments',
)
