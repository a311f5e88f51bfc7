"""Paged decode attention kernels: Triton on CUDA, C++ on CPU; each is optional and has a PyTorch twin
(engine/layers/attention.py)."""
