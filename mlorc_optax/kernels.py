"""The two-pass MLorc step's kernels, their references and settings.

The building blocks under ``mlorc_optax.mlorc_adamw(...,
implementation='pallas' | 'xla')``, for benchmarks and for users who tune
or test the kernels themselves. Each pass is a Pallas kernel (Triton on an
NVIDIA GPU, Pallas' interpreter with ``interpret=True``) with a plain
``jax.numpy`` reference of the same arguments:

* MLorc-AdamW (paper Algorithm 1): :func:`sketch_pass` /
  :func:`sketch_pass_reference` (pass 1) and :func:`project_pass` /
  :func:`project_pass_reference` (pass 2), with the per-matrix scalars of
  :class:`AdamCoefficients`;
* MLorc-Lion (Algorithm 2): :func:`lion_sketch_pass`,
  :func:`lion_project_pass` and their references, with
  :class:`LionCoefficients`;
* the small Gram-based factorizations between and after the passes:
  :func:`orthonormal_bases`, :func:`svds_of_projections`;
* whole steps over many leaves: :func:`adam_step`, :func:`lion_step`.

Nothing here chooses an implementation or looks at the devices: ``config`` (a
frozen, hashable :class:`KernelConfig`, with a :class:`PassTiling` per pass
and gradient width where one differs from its fields) and ``interpret`` are
passed explicitly, :func:`supports` says which matrices the kernels can tile
and :func:`kernel_widths` how wide factors and sketches must be (sketches, and
factors wider than ``KernelConfig.fma_max_rank``, padded with zero columns to
a power of two >= 16 for the tensor-core dots; narrower factors at their own
rank, reconstructed with float32 multiply-adds).

Examples:
  >>> import jax.numpy as jnp
  >>> from mlorc_optax import kernels
  >>> kernels.supports(4096, 11008, kernels.KernelConfig())
  True
  >>> g = jnp.ones((1, 32, 64))
  >>> omega = jnp.ones((1, 64, 16))
  >>> y = kernels.lion_sketch_pass(g, omega, interpret=True)
  >>> y.shape, float(y[0, 0, 0])
  ((1, 32, 16), 64.0)

References:
  Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
  Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897.
"""

from mlorc_optax._src.kernels.adam import ProjectPassOutputs
from mlorc_optax._src.kernels.adam import SketchPassOutputs
from mlorc_optax._src.kernels.adam import project_pass
from mlorc_optax._src.kernels.adam import project_pass_reference
from mlorc_optax._src.kernels.adam import sketch_pass
from mlorc_optax._src.kernels.adam import sketch_pass_reference
from mlorc_optax._src.kernels.gram import orthonormal_bases
from mlorc_optax._src.kernels.gram import svds_of_projections
from mlorc_optax._src.kernels.launch import PASSES
from mlorc_optax._src.kernels.launch import KernelConfig
from mlorc_optax._src.kernels.launch import PassTiling
from mlorc_optax._src.kernels.launch import kernel_widths
from mlorc_optax._src.kernels.launch import supports
from mlorc_optax._src.kernels.lion import LionCoefficients
from mlorc_optax._src.kernels.lion import LionProjectPassOutputs
from mlorc_optax._src.kernels.lion import lion_project_pass
from mlorc_optax._src.kernels.lion import lion_project_pass_reference
from mlorc_optax._src.kernels.lion import lion_sketch_pass
from mlorc_optax._src.kernels.lion import lion_sketch_pass_reference
from mlorc_optax._src.step_math import AdamCoefficients
from mlorc_optax._src.two_pass import AdamLeafInputs
from mlorc_optax._src.two_pass import LionLeafInputs
from mlorc_optax._src.two_pass import adam_step
from mlorc_optax._src.two_pass import lion_step

__all__ = (
    'AdamCoefficients',
    'AdamLeafInputs',
    'KernelConfig',
    'LionCoefficients',
    'LionLeafInputs',
    'LionProjectPassOutputs',
    'PASSES',
    'PassTiling',
    'ProjectPassOutputs',
    'SketchPassOutputs',
    'adam_step',
    'kernel_widths',
    'lion_project_pass',
    'lion_project_pass_reference',
    'lion_sketch_pass',
    'lion_sketch_pass_reference',
    'lion_step',
    'orthonormal_bases',
    'project_pass',
    'project_pass_reference',
    'sketch_pass',
    'sketch_pass_reference',
    'supports',
    'svds_of_projections',
)
