"""atoll: training and running models across islands of compute (JAX/XLA)."""

from setuptools import find_packages, setup

setup(
    name="atoll",
    version="0.1.0",
    description="JAX research codebase: sharded LMs, low-communication training, "
    "robot policies, async checkpointing, Pallas kernels.",
    packages=find_packages(include=["atoll", "atoll.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.88",
        "tensorstore>=0.1.70",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Meta-World v3 (state observations, scripted experts) pins its MuJoCo;
        # the policy server's wire format and transport.
        "robot": ["metaworld==3.1.1", "gymnasium>=1.1", "websockets>=12", "msgpack>=1.0"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
    },
)
