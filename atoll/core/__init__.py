"""Math: pure functions and flax.linen modules. No mesh, no I/O."""
