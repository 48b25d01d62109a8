"""Triton kernels, installed as advfast.kernels. Import triton lazily: it is an optional dependency."""
