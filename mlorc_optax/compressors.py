"""How moments are compressed: the protocol and the paper's randomized SVD.

Others, beyond the paper, are in :mod:`mlorc_optax.contrib`.
"""

from mlorc_optax._src.compressors import FactorSpec
from mlorc_optax._src.compressors import MomentCompressor
from mlorc_optax._src.compressors import RSVDCompressor
from mlorc_optax._src.compressors import nonnegative_second_moment
from mlorc_optax._src.compressors import has_left_basis
from mlorc_optax._src.compressors import streamable
from mlorc_optax._src.rsvd import reconstruct

__all__ = (
    'FactorSpec',
    'MomentCompressor',
    'RSVDCompressor',
    'nonnegative_second_moment',
    'reconstruct',
    'has_left_basis',
    'streamable',
)
