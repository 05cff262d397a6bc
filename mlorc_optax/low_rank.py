"""The wrapper :func:`mlorc_optax.low_rank_moments`: moment specs, fast steps."""

from mlorc_optax._src.fast_steps import AdamFastStep
from mlorc_optax._src.fast_steps import LionFastStep
from mlorc_optax._src.low_rank import DEFAULT_MOMENTS
from mlorc_optax._src.low_rank import LowRankMomentsState
from mlorc_optax._src.low_rank import MomentSpec
from mlorc_optax._src.low_rank import low_rank_moments

__all__ = (
    'AdamFastStep',
    'LionFastStep',
    'DEFAULT_MOMENTS',
    'LowRankMomentsState',
    'MomentSpec',
    'low_rank_moments',
)
