"""ml_collections config files; each module's docstring is a recipe."""
