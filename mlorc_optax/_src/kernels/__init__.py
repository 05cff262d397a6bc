"""The two passes of the MLorc step as Pallas kernels, with ``jax.numpy`` twins.

Each pass comes as a Pallas kernel (Triton lowering on NVIDIA GPUs, Pallas'
interpreter elsewhere) and a plain ``jax.numpy`` reference that is its
specification: :mod:`.adam` (MLorc-AdamW, paper Algorithm 1) and :mod:`.lion`
(MLorc-Lion, Algorithm 2); :mod:`.gram` holds the small Gram-based
factorizations between and after the passes, :mod:`.launch` the grid, the
tiles and the static :class:`~.launch.KernelConfig`.

This package holds no policy: it knows nothing of optax or flax, never looks
at the devices, and runs what it is told (``interpret`` and ``config`` are
explicit arguments of every pass). Which implementation a leaf gets is
decided above it; :mod:`mlorc_optax._src.two_pass` orchestrates the passes of
one step.
"""
