"""The benchmark's memory report: what the forward pass saves for the backward pass."""
import pathlib
import runpy

import jax

from mixreorg_jax import benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]


def saved_bytes(remat: bool, mix: bool) -> int:
    config = runpy.run_path(str(REPO / "configs" / "mixreorg.py"))["get_config"]("tiny")
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
