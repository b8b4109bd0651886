"""Data: dataset specs and loading, on-disk readers, the decoded-dataset cache, image grids."""
