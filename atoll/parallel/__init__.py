"""Placement and communication: meshes, sharding rules, sharded train state."""
