"""Triton kernels of megarl, installed as ``megarl.kernels`` (one file per op)."""
