"""Triton kernels of amem_sgl: each module holds a kernel, its launcher and a torch reference."""
