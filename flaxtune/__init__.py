"""flaxtune: Transformers in JAX/Flax, fine-tuned fully or parameter-efficiently."""

__version__ = "0.1.0"
