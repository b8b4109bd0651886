"""Config presets as JSON files; each lists only what differs from progvae.core.config.Config."""
