"""Metrics: the evaluate command, the importance-weighted bound, FID, fid_digits, LPIPS and where their weights come from."""
