"""The reusable logic behind the pipeline's stages; stage scripts stay thin."""
