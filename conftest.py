"""Root pytest configuration: XLA settings for the CPU test run.

8 simulated CPU devices for the sharding tests and LLVM's optimisation
level 0 (see below), then the settings every program of this repository
runs XLA with (:func:`benchmarks.toolkit.environment.configure_xla`: the
classic CPU scheduler and an XLA:CPU thread pool large enough for jaxlib's
batched LAPACK calls). XLA reads these once, when JAX initialises
its backends, so they are set here, before any test module imports JAX. An
existing XLA_FLAGS is kept, flag by flag, and so is an existing NPROC.
"""

import os

from benchmarks.toolkit import environment

environment.add_xla_flags(
    '--xla_force_host_platform_device_count=8',
    # The suite spends most of its time compiling small programs, each test
    # its own: without LLVM's optimisation passes, three of the slowest
    # tests (a jit-against-eager check, two Pallas-interpret steps) took 79
    # instead of 107 s on a 2-core machine, and three that run many steps 93
    # instead of 105 s. The tests' tolerances come from the documented
    # precision, not from one code generator's rounding (the suite must pass
    # on any x86-64 CPU), so they hold at either level.
    '--xla_backend_optimization_level=0',
)
# And most of what remains is XLA:CPU's MLIR fusion emitters: with its older
# elemental emitters tests/test_compat.py took 45 instead of 74 s on a 2-core
# machine, and a small mlorc_adamw update compiled in 0.5 instead of 1.3 s
# (the tolerances hold for the same reason). Newer jaxlibs (0.11.2) no longer
# know the flag, and XLA aborts on an unknown flag: so only where it is known
# (probed once: the xdist workers inherit the controller's XLA_FLAGS).
environment.add_xla_flags('--xla_cpu_use_fusion_emitters=false', probe=True)
# After the device count: the pool is sized by it. Without the larger pool,
# tests/test_sharding.py::test_sharded_full_rank_run_equals_single_device
# hung in CI, and two copies of it run side by side hung one of the two in 3
# of 3 tries on a 2-core machine (none in 8 with a pool of 32 or 64).
environment.configure_xla()
