"""Hydra configs of a trial (shipped inside the package as mnist_sweep.conf)."""
