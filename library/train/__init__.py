"""Training: noise and timesteps, loss formulas, and the training loop built on them."""
