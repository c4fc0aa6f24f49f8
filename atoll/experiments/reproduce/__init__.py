"""One script per paper: --preset=ci|full --out=DIR."""
