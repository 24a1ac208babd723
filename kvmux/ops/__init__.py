"""The model's kernels, each a thin Python layer that checks tensors and calls the native code: paged
attention (CPU, CUDA, and the torch reference), the packed-weight linear, fused element-wise steps."""
