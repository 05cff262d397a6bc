"""LLaMA-style decoder example: optax.adamw vs mlorc_adamw (see README.md)."""
