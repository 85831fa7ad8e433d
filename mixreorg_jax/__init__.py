"""MixReorg and GroupViT in JAX/Flax."""
