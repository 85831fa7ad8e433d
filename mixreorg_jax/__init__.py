"""MixReorg and GroupViT in JAX/Flax: `mixreorg_jax.load(path)` gives a model for inference."""


def load(path: str):
    """Loads a model checkpoint, a training workdir or a Hugging Face GroupViT folder."""
    from mixreorg_jax import api  # Deferred: `python -m mixreorg_jax.x` need not pay for it.

    return api.load(path)
