"""The benchmark's memory report: what the forward pass saves for the backward pass."""
import importlib.util
import pathlib

import jax

from mixreorg_jax import benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(remat: bool, mix: bool):
    spec = importlib.util.spec_from_file_location("mixreorg_config", REPO / "configs" / "mixreorg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = benchmark.variant(module.get_config("tiny"), mix=mix)
    config.data.batch_size = 16
    config.model.remat = remat
    return config


def saved_bytes(remat: bool, mix: bool) -> int:
    _, _, abstract, _, batch, mesh = benchmark.build_step(tiny_config(remat, mix))
    with jax.set_mesh(mesh):
        return benchmark.saved_for_backward_bytes(tiny_config(remat, mix), abstract, batch)


def test_remat_shrinks_what_the_forward_pass_saves():
    for mix in (False, True):
        plain, remat = saved_bytes(False, mix), saved_bytes(True, mix)
        # Block remat keeps each block's input instead of its attention and MLP activations.
        assert 0 < remat < 0.7 * plain, (mix, plain, remat)
    # MixReorg's extra branches are saved too.
    assert saved_bytes(False, True) > saved_bytes(False, False)
