"""Experiments built on training runs: rate-distortion sweeps and the progressive-coding experiment."""
