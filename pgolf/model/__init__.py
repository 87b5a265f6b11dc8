"""The model stage's code: the GPT (record architecture and its options), attention backends and fused kernels."""
