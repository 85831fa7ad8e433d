r"""How fast can the image encoder learn the synthetic world's classes? A supervised probe.

  python -m mixreorg_jax.experiments.probe --readout=pooled --steps=300
  python -m mixreorg_jax.experiments.probe --readout=patch_max --weight_init=lecun_normal

Trains the `demo` image encoder (GroupViT's vision tower, with training-mode grouping) plus a
head on class presence (sigmoid cross-entropy over the world's classes), with AdamW, on freshly
generated examples, and prints one JSON line every `--log_every` steps: the loss and the
fraction of held-out images whose top-scoring class is present (the label prior is ~0.25 for
1-3 objects of 8 classes). It separates "the world is hard" from "the readout is slow":

  readout     the features the head sees
  pooled      GroupViT's image feature: the mean of the final segment tokens
  segments1   the mean of the segment tokens out of the first grouping block
  patch_mean  the mean of the stage-1 patch tokens (a plain ViT, no grouping)
  patch_max   their maximum over patches

`--export=DIR` saves the trained model. With `--readout=patch_mean` its patch embedding and
stage-1 blocks are the synthetic world's stand-in for MixReorg's ImageNet-pretrained backbone
(method.md §3: supervised on image-level labels, no masks), which training loads with
`--config.model_init=DIR --config.model_init_load="$BACKBONE"` (`model_init.BACKBONE`; the demo
variant's default), everything else starting fresh:

  python -m mixreorg_jax.experiments.probe --readout=patch_mean --weight_init=lecun_normal \
      --lr=3e-3 --steps=600 --export=~/tensorflow_datasets/mixreorg_backbone

`--head=batchnorm` (default) standardises each feature over the batch before the linear map, as
the model's projector does with its BatchNorm (held-out features use the held-out batch's
statistics). A plain `--head=linear` on LayerNorm-ed features learns far slower: their
image-independent part dominates and the head cannot scale the rest up fast enough
(docs/synthetic_learnability.md).
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from mixreorg_jax.data import synthetic
from mixreorg_jax.formats import model_files
from mixreorg_jax.models import groupvit, presets

flags.DEFINE_enum(
    "readout", "pooled", ["pooled", "segments1", "patch_mean", "patch_max"], "Features."
)
flags.DEFINE_enum("head", "batchnorm", ["batchnorm", "linear"], "Head over the features.")
flags.DEFINE_enum("weight_init", "groupvit", list(groupvit.WEIGHT_INITS), "Model init.")
flags.DEFINE_string("model", "demo", "Model preset.")
flags.DEFINE_float("lr", 1e-3, "AdamW learning rate (constant).")
flags.DEFINE_integer("steps", 300, "Training steps.")
flags.DEFINE_integer("batch_size", 64, "Images per step.")
flags.DEFINE_integer("log_every", 50, "Steps between evaluations.")
flags.DEFINE_string(
    "world",
    '{"class_texture_prob": 1.0}',
    "JSON overrides of the WorldConfig (image_size follows the model).",
)
flags.DEFINE_integer("seed", 0, "Initialisation seed.")
flags.DEFINE_string(
    "export",
    None,
    "Write the trained model here (`model_files.save_model`), "
    "e.g. a backbone for `--config.model_init` (see the module doc).",
)

MEAN, STD = 0.45, 0.25


def make_batch(world: synthetic.WorldConfig, split: str, start: int, size: int):
    """(images float32 [B, S, S, 3] normalised, presence float32 [B, classes])."""
    examples = [synthetic.generate_example(i, split, world) for i in range(start, start + size)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 255
    presence = np.zeros((size, world.num_classes), np.float32)
    for row, example in enumerate(examples):
        presence[row, [o["class_id"] - 1 for o in example["objects"]]] = 1
    return (images - MEAN) / STD, presence


def features(model, images, readout: str):
    vision = model.vision
    if readout == "pooled":
        return vision(images, train=True)["pooled"]
    x = vision.embed(images)
    x, group_tokens = vision.stage1(x, vision.stage1_group_tokens(x.shape[0]), train=True)
    if readout == "segments1":
        return vision.stages[0].regroup(x, group_tokens, train=True)[0].mean(axis=1)
    return x.mean(axis=1) if readout == "patch_mean" else x.max(axis=1)


def run(
    model_config,
    world,
    *,
    readout,
    lr,
    steps,
    batch_size,
    log_every,
    head="batchnorm",
    seed=0,
    held_out_size=256,
    jit=jax.jit,
    export=None,
):
    """Trains the probe; returns the logged records. `jit` compiles its two functions.

    With `export` (a new directory) it also saves the model's variables there, the head left out.
    """
    model = groupvit.GroupViT(model_config)
    variables = groupvit.init_variables(model_config, jax.random.key(seed))
    params = {
        "model": variables["params"],
        "head": jnp.zeros((model_config.width, world.num_classes)),
        "bias": jnp.zeros((world.num_classes,)),
    }
    tx = optax.adamw(lr)

    def logits_fn(params, images, rng):
        feats = model.apply(
            {"params": params["model"]},
            images,
            readout,
            method=features,
            rngs={"gumbel": rng, "dropout": rng},
        )
        if head == "batchnorm":
            feats = (feats - feats.mean(axis=0)) * jax.lax.rsqrt(feats.var(axis=0) + 1e-5)
        return feats @ params["head"] + params["bias"]

    @jit
    def step(params, opt_state, images, presence, rng):
        def loss_fn(params):
            return optax.sigmoid_binary_cross_entropy(
                logits_fn(params, images, rng), presence
            ).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    held_out = make_batch(world, "validation", 0, held_out_size)
    top_present = jit(
        lambda params, images, presence, rng: jnp.mean(
            presence[jnp.arange(len(presence)), jnp.argmax(logits_fn(params, images, rng), -1)]
        )
    )
    opt_state, records, start = tx.init(params), [], time.time()
    for i in range(steps):
        images, presence = make_batch(world, "train", i * batch_size, batch_size)
        params, opt_state, loss = step(params, opt_state, images, presence, jax.random.key(i))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            records.append(
                dict(
                    step=i + 1,
                    loss=float(loss),
                    seconds=round(time.time() - start, 1),
                    held_out_top_class_present=float(
                        top_present(params, *held_out, jax.random.key(-1))
                    ),
                )
            )
            print(json.dumps(dict(readout=readout, head=head, **records[-1])), flush=True)
    if export:
        model_files.save_model(export, dict(variables, params=params["model"]), model_config)
    return records


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    model_config = presets.get_model_config(FLAGS.model)
    model_config.weight_init = FLAGS.weight_init
    world = synthetic.WorldConfig(
        **{**json.loads(FLAGS.world), "image_size": model_config.image_size}
    )
    run(
        model_config,
        world,
        readout=FLAGS.readout,
        lr=FLAGS.lr,
        steps=FLAGS.steps,
        batch_size=FLAGS.batch_size,
        log_every=FLAGS.log_every,
        head=FLAGS.head,
        seed=FLAGS.seed,
        export=FLAGS.export,
    )


if __name__ == "__main__":
    app.run(main)
