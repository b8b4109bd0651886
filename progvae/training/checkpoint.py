"""The checkpoint file's name and format: what `Trainer.state_dict` writes to it is read back by
`progvae.runs` through `progvae.core.untrusted.load_checkpoint`."""

CHECKPOINT = "checkpoint.pt"
