"""The benchmark's memory report: what the forward pass saves for the backward pass."""

import pathlib

import jax

from mixreorg_jax import benchmark
from mixreorg_jax.training import config as train_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def saved_bytes(remat: bool, mix: bool) -> int:
    config = train_config.from_file(f"{REPO}/configs/mixreorg.py:tiny")
    config = benchmark.variant(config, mix=mix)
    config.data.batch_size = 16
    config.model.remat = remat
    _, _, abstract, _, batch, mesh = benchmark.build_step(config)
    with jax.set_mesh(mesh):
        return benchmark.saved_for_backward_bytes(config, abstract, batch)


def test_remat_shrinks_what_the_forward_pass_saves():
    for mix in (False, True):
        plain, remat = saved_bytes(False, mix), saved_bytes(True, mix)
        # Block remat keeps each block's input instead of its attention and MLP activations.
        assert 0 < remat < 0.7 * plain, (mix, plain, remat)
    # MixReorg's extra branches are saved too.
    assert saved_bytes(False, True) > saved_bytes(False, False)


def test_devices_given_ahead_of_time_get_an_abstract_batch_of_the_same_shapes():
    # The `--topology` path: devices that may not exist here, so the batch is shapes only.
    config = train_config.from_file(f"{REPO}/configs/mixreorg.py:tiny")
    config.data.batch_size = 16
    _, _, abstract, _, concrete, _ = benchmark.build_step(config)
    _, _, _, _, shapes, mesh = benchmark.build_step(config, jax.devices())
    assert set(shapes) == set(concrete)
    for name, array in concrete.items():
        assert isinstance(shapes[name], jax.ShapeDtypeStruct)
        assert (shapes[name].shape, shapes[name].dtype) == (array.shape, array.dtype), name
        assert shapes[name].sharding == array.sharding, name
    with jax.set_mesh(mesh):
        assert benchmark.saved_for_backward_bytes(
            config, abstract, shapes
        ) == benchmark.saved_for_backward_bytes(config, abstract, concrete)
