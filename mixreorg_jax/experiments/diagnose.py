r"""Where does a trained model's zero-shot segmentation fail? Text, image or segment level.

  python -m mixreorg_jax.experiments.diagnose --model=WORKDIR [--world='{"max_objects": 2}'] \
      [--mixing]

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

With `--mixing`, also MixReorg's mixed branch (evaluation mode, one mixing plan of the
workdir's `mix` settings, the base config's (docs/method.md §4) for a model without them):

  mixed_segment_source_purity
                        for each final segment of a mixed image, the share of its patches that
                        came from its most common source image, averaged over segments
  shuffled_source_purity
                        the same segments scored against another, independent plan's sources:
                        what a grouping that ignores where its patches came from gets
  mixed_patch_accuracy_object, mixed_patch_accuracy_background
                        of the object (background) patches of mixed images whose sources differ
                        in classes, the fraction whose segment matches their own source best
                        among the group's sources (each scored by the mean of its class prompts):
                        the mixed-segmentation loss's task, with class prompts for captions
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from etils import epath

import mixreorg_jax
from mixreorg_jax.data import synthetic
from mixreorg_jax.models import mixreorg
from mixreorg_jax.ops import segmentation
from mixreorg_jax.training import config as train_config


def define_flags():
    """Defined only when run as a program: other programs imported beside it in tests define
    flags of the same names."""
    flags.DEFINE_string("model", None, "A training workdir or model checkpoint.", required=True)
    flags.DEFINE_string(
        "world",
        "{}",
        "JSON overrides of the world the model trained on (image_size follows the model).",
    )
    flags.DEFINE_integer("num_images", 256, "Test images to generate.")
    flags.DEFINE_bool("mixing", False, "Also measure the mixed branch (module docstring).")


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


def diagnose(
    model: "mixreorg_jax.Model", world: synthetic.WorldConfig, num_images: int = 256
) -> dict:
    """The numbers of the module docstring for `model` on `world`'s test split."""
    text = _class_prompts(model, world)
    cosine = text @ text.T
    off_diagonal = cosine[~np.eye(len(text), dtype=bool)]

    images, present, patch_labels = _images_and_patch_labels(
        world, num_images, model.config.patch_size
    )
    out = jax.jit(lambda v, x: model.module.apply(v, x, method=lambda m, im: m.encode_image(im)))(
        model.variables, jnp.asarray(images)
    )
    image_class = np.asarray(out["embedding"]) @ text.T
    top = image_class.argmax(axis=1) + 1
    segments = np.asarray(
        model.module.apply(
            model.variables, out["segments"], method=lambda m, s: m.project_segments(s)
        )
    )
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
        num_images=num_images,
    )


def _class_prompts(model: "mixreorg_jax.Model", world: synthetic.WorldConfig) -> np.ndarray:
    """[C, D] embeddings of "a photo of a {class}." for the world's classes, in class order."""
    names = synthetic.class_names(world)[1:]
    return np.asarray(model.encode_text([f"a photo of a {n}." for n in names]))


def majority_share(owner, source) -> list[float]:
    """For each segment of each image, the share of its patches from its most common source.

    owner, source: int[M, N], each patch's segment and its source's in-group index."""
    shares = []
    for segment_of, source_of in zip(owner, source):
        for g in np.unique(segment_of):
            shares.append(np.bincount(source_of[segment_of == g]).max() / np.sum(segment_of == g))
    return shares


def diagnose_mixing(
    model: "mixreorg_jax.Model", world: synthetic.WorldConfig, mix: dict, num_images: int = 256
) -> dict:
    """The `--mixing` numbers of the module docstring; `mix`: the train config's `mix` settings
    (a dict), as `models.mixreorg.image_forward` takes them."""
    k = mix["group_size"]
    if num_images < k:
        raise ValueError(f"--mixing needs at least one group of {k} images, got {num_images}")
    num_images -= num_images % k
    images, present, patch_labels = _images_and_patch_labels(
        world, num_images, model.config.patch_size
    )
    grid = (world.image_size // model.config.patch_size,) * 2
    plan, other = (mixreorg.mixing_plan(jax.random.key(i), mix, num_images, grid) for i in (0, 1))

    def mixed_segments(module, x):
        out = mixreorg.image_forward(module, x, plan, mix, train=False, restored=False)
        return out["mixed_segments"], out["mixed_assignment"]["hard"]

    segments, assignment = jax.jit(lambda v, x: model.module.apply(v, x, method=mixed_segments))(
        model.variables, jnp.asarray(images)
    )
    owner = np.asarray(assignment).argmax(-1)  # [B, N]
    member = np.asarray(plan.member)  # each patch's source, as an in-group index

    text = _class_prompts(model, world)
    sources_text = np.stack([text[sorted(c - 1 for c in p)].mean(0) for p in present])
    sources_text /= np.linalg.norm(sources_text, axis=1, keepdims=True)
    # [B, G, K] segment-source scores; [B, N] the source each patch's segment matches best.
    segment_source = np.einsum(
        "bgd,bkd->bgk", np.asarray(segments), sources_text[np.asarray(plan.group_captions)]
    )
    right = np.take_along_axis(segment_source.argmax(-1), owner, axis=1) == member
    is_object = patch_labels[np.asarray(plan.source), np.arange(member.shape[1])] > 0
    # Mixed images whose K sources all show different sets of classes.
    distinct = np.repeat(
        [len({frozenset(p) for p in present[i : i + k]}) == k for i in range(0, num_images, k)], k
    )[:, None]
    return dict(
        mixed_segment_source_purity=float(np.mean(majority_share(owner, member))),
        shuffled_source_purity=float(np.mean(majority_share(owner, np.asarray(other.member)))),
        mixed_patch_accuracy_object=float(right[distinct & is_object].mean()),
        mixed_patch_accuracy_background=float(right[distinct & ~is_object].mean()),
    )


def training_config(path: str) -> dict:
    """The config.json of a training workdir at `path` (a dict), else {}."""
    config_file = epath.Path(path).expanduser() / "config.json"
    return json.loads(config_file.read_text()) if config_file.exists() else {}


def run(
    path: str, world_overrides: str = "{}", num_images: int = 256, with_mixing: bool = False
) -> dict:
    """The command line's result for the model at `path`; bad input exits with a one-line error."""
    trained = training_config(path)
    try:
        model = mixreorg_jax.load(path)
        world = synthetic.WorldConfig(
            **{
                **trained.get("data", {}).get("synthetic_world", {}),
                **json.loads(world_overrides),
                "image_size": model.config.image_size,
            }
        )
    except (ValueError, TypeError, FileNotFoundError) as e:  # JSONDecodeError is a ValueError
        raise SystemExit(f"error: {e}") from None
    result = dict(model=path, **diagnose(model, world, num_images))
    if with_mixing:
        # The base config's mixing (docs/method.md §4) where the workdir does not say how it mixed.
        mix = {**train_config.base_config().mix.to_dict(), **trained.get("mix", {})}
        try:
            result.update(diagnose_mixing(model, world, mix, num_images))
        except ValueError as e:  # e.g. a block size that does not divide the patch grid
            raise SystemExit(f"error: {e}") from None
    return result


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    print(json.dumps(run(FLAGS.model, FLAGS.world, FLAGS.num_images, FLAGS.mixing)))


if __name__ == "__main__":
    define_flags()
    app.run(main)
