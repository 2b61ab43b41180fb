"""AnchorEdit in JAX/Flax: autoregressive diffusion for long multi-turn image editing."""

__version__ = "0.1.0"
