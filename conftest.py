"""Root pytest configuration: XLA flags for the CPU test run.

8 simulated CPU devices for the sharding tests, the classic CPU scheduler
and LLVM's optimisation level 0 (see below). XLA reads the flags once, when
JAX initialises its backends, so they are set here, before any test module
imports JAX. An existing XLA_FLAGS is kept, flag by flag.
"""

import os

_FLAGS = (
    '--xla_force_host_platform_device_count=8',
    # jaxlib 0.10's concurrency-optimised CPU scheduler intermittently
    # deadlocks programs with several independent QR/SVD chains (seen here
    # with MLorc's update on stacked leaves); the classic scheduler doesn't.
    '--xla_cpu_enable_concurrency_optimized_scheduler=false',
    # The suite spends most of its time compiling small programs, each test
    # its own: without LLVM's optimisation passes, three of the slowest
    # tests (a jit-against-eager check, two Pallas-interpret steps) took 79
    # instead of 107 s on a 2-core machine, and three that run many steps 93
    # instead of 105 s. The tests' tolerances come from the documented
    # precision, not from one code generator's rounding (the suite must pass
    # on any x86-64 CPU), so they hold at either level.
    '--xla_backend_optimization_level=0',
)
for _flag in _FLAGS:
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + ' ' + _flag
    ).strip()
