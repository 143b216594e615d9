"""The element-wise work around the matmuls of a decoder layer, as whole-row fused ops.

`reference` holds the PyTorch definitions (the CPU path and the test oracle); `triton_fused` holds
one-launch Triton kernels with the same signatures for CUDA. The attention backend
(sinkcache.core.attention.backend) hands the model one set or the other.
"""
