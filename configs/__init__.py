"""Config presets as JSON files; each lists only what differs from progvae.config.Config."""
