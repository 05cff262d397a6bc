"""MLorc: Momentum Low-rank Compression as Optax gradient transformations.

Paper: https://arxiv.org/abs/2506.01897. ``mlorc_adamw`` and ``mlorc_lion`` are
drop-in replacements for ``optax.adamw`` and ``optax.lion`` whose optimizer
state holds only low-rank factors of each matrix parameter's moments.
"""

from mlorc_optax._src.alias import mlorc_adamw
from mlorc_optax._src.alias import mlorc_lion
from mlorc_optax._src.logical import DENSE_GENERAL_JOINED_NAMES
from mlorc_optax._src.logical import RANK_AXIS_NAME
from mlorc_optax._src.logical import factor_logical_axes
from mlorc_optax._src.logical import format_logical_plan
from mlorc_optax._src.logical import logical_dimension_numbers
from mlorc_optax._src.compressors import COMPRESSORS
from mlorc_optax._src.compressors import FactorSpec
from mlorc_optax._src.compressors import LoRAPreCompressor
from mlorc_optax._src.compressors import LoRAPreFactors
from mlorc_optax._src.compressors import MomentCompressor
from mlorc_optax._src.compressors import RSVDCompressor
from mlorc_optax._src.compressors import WarmStartCompressor
from mlorc_optax._src.compressors import nonnegative_second_moment
from mlorc_optax._src.extras import GramsState
from mlorc_optax._src.extras import grams
from mlorc_optax._src.extras import orthograd
from mlorc_optax._src.extras import scale_by_adam_atan2
from mlorc_optax._src.masking import DEFAULT_EXCLUDED_NAMES
from mlorc_optax._src.masking import LeafPlan
from mlorc_optax._src.masking import MatrixDimensionNumbers
from mlorc_optax._src.masking import MatrixView
from mlorc_optax._src.masking import compression_plan
from mlorc_optax._src.masking import format_plan
from mlorc_optax._src.masking import path_mask
from mlorc_optax._src.mlorc import MLorcAdamState
from mlorc_optax._src.mlorc import MLorcLionState
from mlorc_optax._src.mlorc import scale_by_mlorc_adam
from mlorc_optax._src.mlorc import scale_by_mlorc_lion
from mlorc_optax._src.rsvd import LowRankFactors
from mlorc_optax._src.rsvd import randomized_svd
from mlorc_optax._src.rsvd import reconstruct
from mlorc_optax._src.sharding import factor_partition_specs
from mlorc_optax._src.sharding import state_shardings

__version__ = '0.1.0'

__all__ = (
    'COMPRESSORS',
    'DEFAULT_EXCLUDED_NAMES',
    'DENSE_GENERAL_JOINED_NAMES',
    'FactorSpec',
    'GramsState',
    'LeafPlan',
    'LoRAPreCompressor',
    'LoRAPreFactors',
    'LowRankFactors',
    'MLorcAdamState',
    'MLorcLionState',
    'MatrixDimensionNumbers',
    'MatrixView',
    'MomentCompressor',
    'RANK_AXIS_NAME',
    'RSVDCompressor',
    'WarmStartCompressor',
    'compression_plan',
    'factor_logical_axes',
    'factor_partition_specs',
    'format_logical_plan',
    'format_plan',
    'grams',
    'logical_dimension_numbers',
    'mlorc_adamw',
    'mlorc_lion',
    'nonnegative_second_moment',
    'orthograd',
    'path_mask',
    'randomized_svd',
    'reconstruct',
    'scale_by_adam_atan2',
    'scale_by_mlorc_adam',
    'scale_by_mlorc_lion',
    'state_shardings',
)
