r"""Where does a trained model's zero-shot segmentation fail? Text, image or segment level.

  python -m mixreorg_jax.experiments.diagnose --model=WORKDIR [--world='{"max_objects": 2}']

Runs the model (evaluation mode, as the eval binary does) on freshly generated synthetic-world
test images (the world a training workdir's config.json trained on, with `--world`'s changes;
the default world for any other model), with the prompt "a photo of a {class}." for each class,
and prints one JSON line:

  class_prompt_cosine   mean cosine between the projected prompts of two different classes
                        (1.0: the text side cannot tell the classes apart)
  image_top_class_present
                        fraction of images whose best-matching class (pooled image embedding,
                        as in the image-text loss) is in the image; about 0.25 is chance
  object_segment_accuracy
                        of the final segments whose patches are mostly an object, the fraction
                        whose best-matching class is that object's (the labelling the
                        segmentation metric needs)
  object_segments, groups_per_image
                        how many segments that was, and the mean number of non-empty final
                        segments per image (collapse shows as 1-2)

A model that has learnt the classes at the image level but not at the segment level scores high
on the second and low on the third.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from etils import epath

import mixreorg_jax
from mixreorg_jax.data import synthetic
from mixreorg_jax.ops import segmentation


def define_flags():
    """Defined only when run as a program: the probe, imported beside it in tests, has a
    `--model` flag of its own."""
    flags.DEFINE_string("model", None, "A training workdir or model checkpoint.", required=True)
    flags.DEFINE_string("world", "{}", "JSON overrides of the world the model trained on "
                        "(image_size follows the model).")
    flags.DEFINE_integer("num_images", 256, "Test images to generate.")


def _images_and_patch_labels(world: synthetic.WorldConfig, num_images: int, patch: int):
    """(images float32 [B, S, S, 3] normalised, classes present: list of sets,
    majority label of each patch int[B, N])."""
    examples = [synthetic.generate_example(i, "test", world) for i in range(num_images)]
    images = np.asarray(segmentation.normalize_image(np.stack([e["image"] for e in examples])))
    masks = np.stack([e["mask"] for e in examples])
    grid = world.image_size // patch
    patches = masks.reshape(num_images, grid, patch, grid, patch).transpose(0, 1, 3, 2, 4)
    patches = patches.reshape(num_images, grid * grid, patch * patch)
    counts = (patches[..., None] == np.arange(world.num_classes + 1)).sum(axis=2)
    present = [set(np.unique(m)) - {0} for m in masks]
    return images, present, counts.argmax(axis=-1)


def diagnose(model: "mixreorg_jax.Model", world: synthetic.WorldConfig,
             num_images: int = 256) -> dict:
    """The numbers of the module docstring for `model` on `world`'s test split."""
    names = synthetic.class_names(world)[1:]
    text = np.asarray(model.encode_text([f"a photo of a {n}." for n in names]))
    cosine = text @ text.T
    off_diagonal = cosine[~np.eye(len(names), dtype=bool)]

    images, present, patch_labels = _images_and_patch_labels(world, num_images,
                                                             model.config.patch_size)
    out = jax.jit(lambda v, x: model.module.apply(v, x, method=lambda m, im: m.encode_image(im)))(
        model.variables, jnp.asarray(images))
    image_class = np.asarray(out["embedding"]) @ text.T
    top = image_class.argmax(axis=1) + 1
    segments = np.asarray(model.module.apply(
        model.variables, out["segments"], method=lambda m, s: m.project_segments(s)))
    segment_class = (segments @ text.T).argmax(axis=-1) + 1  # [B, G]
    # Patch -> final segment, chained through the grouping stages.
    owner = np.asarray(segmentation.chain_assignments(out["hard_assignments"])).argmax(-1)  # [B, N]

    right = total = groups = 0
    for b in range(num_images):
        used = np.unique(owner[b])
        groups += len(used)
        for g in used:
            majority = np.bincount(patch_labels[b][owner[b] == g]).argmax()
            if majority:
                total += 1
                right += int(segment_class[b, g] == majority)
    return dict(
        class_prompt_cosine=float(off_diagonal.mean()),
        image_top_class_present=float(np.mean([t in p for t, p in zip(top, present)])),
        object_segment_accuracy=right / max(total, 1),
        object_segments=total,
        groups_per_image=groups / num_images,
        num_images=num_images)


def training_world(path: str) -> dict:
    """The synthetic world settings a training workdir's config.json trained on, else {}."""
    config_file = epath.Path(path).expanduser() / "config.json"
    if not config_file.exists():
        return {}
    return json.loads(config_file.read_text()).get("data", {}).get("synthetic_world", {})


def run(path: str, world_overrides: str = "{}", num_images: int = 256) -> dict:
    """The command line's result for the model at `path`; bad input exits with a one-line error."""
    try:
        model = mixreorg_jax.load(path)
        world = synthetic.WorldConfig(**{**training_world(path), **json.loads(world_overrides),
                                         "image_size": model.config.image_size})
    except (ValueError, TypeError, FileNotFoundError) as e:  # JSONDecodeError is a ValueError
        raise SystemExit(f"error: {e}") from None
    return dict(model=path, **diagnose(model, world, num_images))


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    print(json.dumps(run(FLAGS.model, FLAGS.world, FLAGS.num_images)))


if __name__ == "__main__":
    define_flags()
    app.run(main)
