"""GPU kernels, imported only on CUDA when Triton is installed; everything has a PyTorch twin."""
