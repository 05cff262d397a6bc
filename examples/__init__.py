"""Runnable examples for ``mlorc_optax``.

The examples live outside the core library so that they may use extra,
example-only dependencies (``tokenizers``, ``safetensors``) without the core
package depending on them.
"""
