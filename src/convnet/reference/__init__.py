"""NumPy reference implementations: the oracle for tests and the ``numpy`` device's compute.

Written for clarity and independence from the kernels (vectorised NumPy, float32 and float64), not speed.
"""
