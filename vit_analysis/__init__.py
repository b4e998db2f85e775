"""vit_analysis: the methods of "Do Vision Transformers See Like CNNs?" in JAX/Flax."""

__version__ = "0.1.0"
