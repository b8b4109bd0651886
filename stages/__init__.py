"""Training stages: each supplies its objective (and what else is its own) to progvae.training.loop.train_run."""
