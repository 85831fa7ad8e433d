"""Image-text retrieval on a caption split prepared by `data/captions.py`: recall@k against
numpy from the model's own embeddings, the ranking itself, and the gather over processes."""

import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_eval_classification import (
    CONFIG,
    as_state,
    encoded_image,
    image_embeddings,
    random_variables,
    text_embeddings,
)

from mixreorg_jax.data import augment, captions
from mixreorg_jax.data.tokenizer import get_tokenizer
from mixreorg_jax.evaluation import loop, retrieval
from mixreorg_jax.models import groupvit
from mixreorg_jax.training import sharding

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "purple", "orange")
SHAPES = ("square", "circle")
CAPTIONS = [f"a {colour} {shape} on grass" for colour in COLOURS for shape in SHAPES][:13]


@pytest.fixture(scope="module")
def variables():
    return random_variables(CONFIG, seed=1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 'validation' split of 13 pairs prepared from a captions file and images; the
    dataset's directory (the one above its version directory)."""
    folder = tmp_path_factory.mktemp("pairs")
    lines = ["filename\tcaption"]
    for k, caption in enumerate(CAPTIONS):
        name = f"img{k}.jpg" if k % 3 else f"img{k}.png"
        (folder / name).write_bytes(encoded_image(k, "JPEG" if k % 3 else "PNG"))
        lines.append(f"{name}\t{caption}")
    (folder / "captions.tsv").write_text("\n".join(lines) + "\n")
    version_dir = captions.prepare(
        "pairs",
        {"validation": [str(folder / "captions.tsv")]},
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        tag=lambda tokens: [(t, "NN") for t in tokens],
    )
    return os.path.dirname(version_dir)


def reference(variables, directory: str, count: int) -> dict:
    """Recall@k computed in numpy from the model's embeddings of the first `count` records."""
    builder = tfds.builder_from_directory(os.path.join(directory, "1.0.0"))
    source = builder.as_data_source("validation", decoders={"image": tfds.decode.SkipDecoding()})
    records = [source[k] for k in range(count)]
    crops = np.stack([augment.eval_image(r["image"], size=CONFIG.image_size) for r in records])
    tokens = get_tokenizer(CONFIG.context_length)([r["caption"].decode() for r in records])
    image_emb, text_emb = image_embeddings(variables, crops), text_embeddings(variables, tokens)
    similarity = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T
    # Position of the true partner in each row's (column's) descending order.
    i2t = np.argmax(np.argsort(-similarity, axis=1) == np.arange(count)[:, None], axis=1)
    t2i = np.argmax(np.argsort(-similarity.T, axis=1) == np.arange(count)[:, None], axis=1)
    return {
        f"{kind}_r{k}": float(np.mean(position < k))
        for kind, position in (("i2t", i2t), ("t2i", t2i))
        for k in (1, 5, 10)
    }


def make_evaluator(**fields) -> retrieval.Evaluator:
    eval_config = ml_collections.ConfigDict(dict(batch=5, **fields))
    return retrieval.Evaluator(eval_config, model=groupvit.GroupViT(CONFIG))


def test_recalls_match_numpy(variables, prepared):
    expected = reference(variables, prepared, len(CAPTIONS))
    assert 0 < expected["i2t_r5"] < 1 and expected["t2i_r1"] < expected["t2i_r10"]  # not trivial

    evaluator = make_evaluator(data_dir=prepared, max_images=0)
    results = evaluator.evaluate(variables)
    assert results["num_images"] == len(CAPTIONS) and results["split"] == "validation"
    assert list(results["metrics"]) == [
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
    ]
    assert results["metrics"] == pytest.approx(expected, abs=1e-12)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    with jax.set_mesh(mesh):  # as the training loop calls it
        state = jax.device_put(as_state(variables), sharding.replicated(mesh))
        assert evaluator.run(state) == results["metrics"]

    # The default: the first 1000 pairs (all 13 here); and the first 6 only, from the version
    # directory itself.
    assert make_evaluator(data_dir=prepared).evaluate(variables)["num_images"] == len(CAPTIONS)
    first = make_evaluator(data_dir=os.path.join(prepared, "1.0.0"), max_images=6)
    results = first.evaluate(variables)
    assert results["num_images"] == 6
    assert results["metrics"] == pytest.approx(reference(variables, prepared, 6), abs=1e-12)


def test_bad_settings(prepared, tmp_path):
    with pytest.raises(ValueError, match="no split 'test'"):
        make_evaluator(data_dir=prepared, split="test")
    with pytest.raises(ValueError, match="set data_dir"):
        make_evaluator()
    with pytest.raises(FileNotFoundError, match=f"prepared caption dataset {tmp_path}/x does not"):
        make_evaluator(data_dir=str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="not a prepared TFDS dataset"):
        make_evaluator(data_dir=str(tmp_path))


def test_ranks_count_strictly_better_keys_only():
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    keys = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    # Scores: row 0 [0, 0, 1], row 1 [1, 1, 1], row 2 [1, 1, 2]; the pair is the diagonal.
    np.testing.assert_array_equal(retrieval.ranks(queries, keys), [1, 0, 0])
    np.testing.assert_array_equal(retrieval.ranks(queries, keys, chunk=2), [1, 0, 0])


def test_gather_over_processes_restores_dataset_order(monkeypatch):
    # Three processes, seven rows: process p holds rows p, p + 3, p + 6 (process_indices).
    rows = np.arange(7 * 2).reshape(7, 2)
    shares = [rows[p::3] for p in range(3)]

    def allgather(padded):
        assert padded.shape == (3, 2)  # ceil(7 / 3) rows each
        return np.stack([np.pad(s, ((0, 3 - len(s)), (0, 0))) for s in shares])

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(loop.multihost_utils, "process_allgather", allgather)
    np.testing.assert_array_equal(loop.gather_over_processes(shares[0], 7), rows)
