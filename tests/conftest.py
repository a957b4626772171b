"""Session-wide settings for the test suite."""

import os

# Full float32 matmuls: MLX's CUDA (and M5 Metal) backends default float32 matmuls to TF32, about 1e-3 relative
# error, which would hide or fake a parity failure at the 1e-4 bound. Set before MLX runs its first op.
os.environ["MLX_ENABLE_TF32"] = "0"
