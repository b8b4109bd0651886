"""Evaluation: ELBO, FID, LPIPS, rate-distortion experiments, reports and benchmarks."""
