"""Simulated robot tasks: a JAX-native task suite (`jax_tasks`) and a Meta-World v3 wrapper with
its scripted experts and demo generation (`metaworld`, extra `robot`)."""
