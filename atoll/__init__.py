"""atoll: training and running models across islands of compute."""

__version__ = "0.1.0"
