"""Training stages: each builds its model and objective and hands them to progvae.trainer."""
