"""Simulated robot tasks: a JAX-native task suite (`jax_tasks`)."""
