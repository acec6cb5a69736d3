"""Hot kernels: C++ Paddle custom operators built from ``native/`` with plain-Paddle references."""
