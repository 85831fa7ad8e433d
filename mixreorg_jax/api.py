"""`mixreorg_jax.load(path)`: a trained or converted model, ready to embed images and text.

model = mixreorg_jax.load("/tmp/mixreorg_demo")        # a training workdir
image_emb = model.encode_image(images)                 # float[B, H, W, 3], normalised
text_emb = model.encode_text(["a photo of a cat."])
logits = model.logit_scale * image_emb @ text_emb.T
labels = model.segment(image, ["cat", "dog"], bg_thresh=0.5)   # with model.protocol's sizes
"""

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixreorg_jax import losses
from mixreorg_jax.data.tokenizer import get_tokenizer
from mixreorg_jax.evaluation import inference
from mixreorg_jax.formats import model_files
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import checkpointing


class Model:
    """A GroupViT/MixReorg model for inference (evaluation mode, the original branch only)."""

    def __init__(
        self,
        variables: dict,
        config: ml_collections.ConfigDict,
        protocol: dict | None = None,
    ):
        """Args: protocol: the segmentation protocol `segment` defaults to
        (`model_files.INFERENCE_FIELDS`); default `model_files.default_inference(config)`."""
        self.config = config
        self.protocol = model_files.check_inference(
            protocol or model_files.default_inference(config), "Model"
        )
        self.variables = jax.device_put(variables)
        self.module = groupvit.GroupViT(config)
        self._tokenizer = get_tokenizer(config.context_length)

    @property
    def logit_scale(self) -> float:
        """exp of the learned log-scale, clamped as in training and evaluation."""
        return float(losses.logit_scale(self.variables["params"]["logit_scale"]))

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """int32[N, context_length] CLIP BPE ids."""
        return self._tokenizer(texts)

    @functools.partial(jax.jit, static_argnums=0)
    def _encode_image(self, variables, images):
        return self.module.apply(variables, images, method=groupvit.GroupViT.encode_image)

    @functools.partial(jax.jit, static_argnums=0)
    def _encode_text(self, variables, tokens):
        return self.module.apply(variables, tokens, method=groupvit.GroupViT.encode_text)

    def encode_image(self, images) -> jax.Array:
        """float[B, H, W, 3] normalised images -> L2-normalised embeddings float[B, D]."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != self.config.num_channels:
            raise ValueError(
                f"images must be [B, H, W, {self.config.num_channels}], got {images.shape}"
            )
        return self._encode_image(self.variables, images)["embedding"]

    def encode_text(self, texts: str | Sequence[str]) -> jax.Array:
        """Strings -> L2-normalised embeddings float[N, D]."""
        return self._encode_text(self.variables, jnp.asarray(self.tokenize(texts)))["embedding"]

    def segment(self, image, class_names: Sequence[str], **kwargs) -> np.ndarray:
        """uint8[H, W, 3] RGB -> int32[H, W] labels; see `evaluation.inference.segment`
        (with `bg_thresh`, 0 = background and k = class_names[k - 1]). The protocol's sizes and
        top_k not given (or 0) are `self.protocol`'s."""
        given = {
            name: value for name, value in kwargs.items() if name not in self.protocol or value
        }
        kwargs = {**self.protocol, **given}
        return inference.segment(self.variables, self.config, image, class_names, **kwargs)


def recorded_protocol(path: str, config: ml_collections.ConfigDict) -> dict:
    """The inference protocol of the model at `path` (as `load` takes it): what its model checkpoint
    (a workdir's `export/`) records, else `model_files.default_inference(config)` (a workdir
    without export, a Hugging Face folder)."""
    root = os.path.expanduser(path)
    for checkpoint in (os.path.join(root, "export"), root):
        if os.path.isdir(os.path.join(checkpoint, "model_config")):
            return model_files.read_inference(checkpoint)
    return model_files.default_inference(config)


def load(path: str) -> Model:
    """Loads a model checkpoint, a training workdir or a Hugging Face GroupViT folder, with the
    inference protocol it records (`recorded_protocol`)."""
    variables, config = checkpointing.load_variables(path)
    return Model(variables, config, recorded_protocol(path, config))
