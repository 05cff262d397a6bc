"""Root pytest configuration: XLA flags for the CPU test run.

8 simulated CPU devices for the sharding tests, and the classic CPU scheduler
(see below). XLA reads the flags once, when JAX initialises its backends, so
they are set here, before any test module imports JAX. An existing XLA_FLAGS
is kept.
"""

import os

_FLAGS = (
    '--xla_force_host_platform_device_count=8',
    # jaxlib 0.10's concurrency-optimised CPU scheduler intermittently
    # deadlocks programs with several independent QR/SVD chains (seen here
    # with MLorc's update on stacked leaves); the classic scheduler doesn't.
    '--xla_cpu_enable_concurrency_optimized_scheduler=false',
)
for _flag in _FLAGS:
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + ' ' + _flag
    ).strip()
