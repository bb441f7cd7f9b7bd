"""The GPU verify path: FlashInfer ragged / custom-mask kernels plus the CUDA helpers in csrc/.

Nothing here is imported by the CPU path. FlashInfer is imported only when a
:class:`~tree_attn_backend.attention.gpu.flashinfer_attention.FlashInferTreeAttention` is built, and the
CUDA helper library only when a helper runs on a CUDA tensor.
"""
