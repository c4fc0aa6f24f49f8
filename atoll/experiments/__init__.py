"""absl entry points: train_lm, bench/, reproduce/."""
