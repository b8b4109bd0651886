"""Training: the one training entry point (loop), the update engine (trainer), controllers, checkpoints, distributed helpers and speed switches."""
