"""The networks: VDVAE blocks and model, output heads (linear, DMoL), diagonal Gaussians, the two-stage pipeline and the masked coder."""
