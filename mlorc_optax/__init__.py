"""MLorc: Momentum Low-rank Compression as Optax gradient transformations.

Paper: https://arxiv.org/abs/2506.01897. ``mlorc_adamw`` and ``mlorc_lion`` are
drop-in replacements for ``optax.adamw`` and ``optax.lion`` whose optimizer
state holds only low-rank factors of each matrix parameter's moments;
``low_rank_moments`` does the same for any optax optimizer.

Submodules: :mod:`mlorc_optax.compressors` (how moments are compressed),
:mod:`mlorc_optax.low_rank` (the wrapper's moment specs),
:mod:`mlorc_optax.plan` (matrix views and the per-leaf plan),
:mod:`mlorc_optax.kernels` (the Pallas kernels of the two-pass step),
:mod:`mlorc_optax.contrib` (beyond the paper) and :mod:`mlorc_optax.flax`
(Flax Linen logical axes and boxes).
"""

from mlorc_optax import compressors
from mlorc_optax import contrib
from mlorc_optax import kernels
from mlorc_optax import low_rank
from mlorc_optax import plan
from mlorc_optax._src.alias import STATIC_ARGS
from mlorc_optax._src.alias import mlorc_adamw
from mlorc_optax._src.alias import mlorc_lion
from mlorc_optax._src.transform import PAPER_ADAMW
from mlorc_optax._src.transform import PAPER_LION
from mlorc_optax._src.transform import scale_by_mlorc_adam
from mlorc_optax._src.transform import scale_by_mlorc_lion
from mlorc_optax._src.low_rank import LowRankMomentsState
from mlorc_optax._src.low_rank import low_rank_moments
from mlorc_optax._src.inspection import compression_plan
from mlorc_optax._src.inspection import format_plan
from mlorc_optax._src.views import path_mask
from mlorc_optax._src.rsvd import LowRankFactors
from mlorc_optax._src.rsvd import randomized_svd
from mlorc_optax._src.sharding import factor_partition_specs
from mlorc_optax._src.sharding import state_shardings
from mlorc_optax._src.views import MatrixDimensionNumbers

__version__ = '0.1.0'

__all__ = (
    'LowRankFactors',
    'LowRankMomentsState',
    'MatrixDimensionNumbers',
    'PAPER_ADAMW',
    'PAPER_LION',
    'STATIC_ARGS',
    'compression_plan',
    'factor_partition_specs',
    'format_plan',
    'low_rank_moments',
    'mlorc_adamw',
    'mlorc_lion',
    'path_mask',
    'randomized_svd',
    'scale_by_mlorc_adam',
    'scale_by_mlorc_lion',
    'state_shardings',
)
