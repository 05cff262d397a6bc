"""Beyond the MLorc paper: other compressors and transforms to chain with it.

As ``optax.contrib`` does for optax, this package holds what the paper does
not specify and what has not become a default by measurement:

* :class:`WarmStartCompressor`: the randomized SVD sketched with the
  previous right factor (``docs/compressors.md``);
* :class:`LoRAPreCompressor` / :class:`LoRAPreFactors`: LoRA-Pre's ``B A``
  factors refreshed by damped least squares;
* :class:`FactoredSecondMoment` / :class:`FactoredMoment`: the second moment
  as Adafactor's row and column statistics, the first by the randomized SVD;
* :func:`grams`, :func:`orthograd`, :func:`scale_by_adam_atan2`: transforms
  of the unofficial ``mlorc-optim`` to chain with any optimizer;
  ``mlorc_optax.low_rank_moments(scale_by_adam_atan2())`` is MLorc-Adam-atan2.
"""

from mlorc_optax.contrib._compressors import FactoredMoment
from mlorc_optax.contrib._compressors import FactoredSecondMoment
from mlorc_optax.contrib._compressors import LoRAPreCompressor
from mlorc_optax.contrib._compressors import LoRAPreFactors
from mlorc_optax.contrib._compressors import WarmStartCompressor
from mlorc_optax.contrib._transforms import GramsState
from mlorc_optax.contrib._transforms import grams
from mlorc_optax.contrib._transforms import orthograd
from mlorc_optax.contrib._transforms import scale_by_adam_atan2

__all__ = (
    'FactoredMoment',
    'FactoredSecondMoment',
    'GramsState',
    'LoRAPreCompressor',
    'LoRAPreFactors',
    'WarmStartCompressor',
    'grams',
    'orthograd',
    'scale_by_adam_atan2',
)
