"""The wrapper :func:`mlorc_optax.low_rank_moments` and its moment specs."""

from mlorc_optax._src.low_rank import DEFAULT_MOMENTS
from mlorc_optax._src.low_rank import LowRankMomentsState
from mlorc_optax._src.low_rank import MomentSpec
from mlorc_optax._src.low_rank import low_rank_moments

__all__ = (
    'DEFAULT_MOMENTS',
    'LowRankMomentsState',
    'MomentSpec',
    'low_rank_moments',
)
