"""Attention over arena slots: a PyTorch reference path (CPU, and the oracle for tests) and fused
Triton kernels for CUDA. `select_backend` picks one; both take the same arguments."""

from sinkcache.core.attention.backend import AttentionBackend, select_backend

__all__ = ["AttentionBackend", "select_backend"]
