"""Sweep files (shipped inside the package as mnist_sweep.sweeps)."""
