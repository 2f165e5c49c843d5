"""``fedmq bench``: benchmarks that print and save figures."""
