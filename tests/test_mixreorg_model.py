"""Why the paper config's progressive mixing averages (configs/mixreorg.py, docs/method.md §4b)."""

import jax
import jax.numpy as jnp
import pytest

from mixreorg_jax.models import groupvit, presets
from mixreorg_jax.ops import mixing


def _mixed_to_original_rms(mode: str) -> list[float]:
    """RMS of the mixed branch's patch tokens over the original branch's after each stage-1
    block after Lc = 1, GroupViT-S at initialisation, progressive weight 1 in `mode`."""
    config = presets.get_model_config("groupvit_s")
    config.image_size = 64  # a 4 x 4 grid: the same blocks, fewer tokens
    model = groupvit.GroupViT(config)
    variables = groupvit.init_variables(config, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    plan = mixing.mixing_plan(jax.random.key(2), 4, (4, 4), 2, 1)

    def run(module):
        vision, batch = module.vision, images.shape[0]
        x = vision.embed(images)
        x, g = vision.stage1(x, vision.stage1_group_tokens(batch), blocks=slice(0, 1))
        mixed, mixed_g = mixing.mix_tokens(x, plan), vision.stage1_group_tokens(batch)
        ratios = []
        for i in range(1, config.depths[0]):
            both, both_g = vision.stage1(
                jnp.concatenate([x, mixed]), jnp.concatenate([g, mixed_g]), blocks=slice(i, i + 1)
            )
            x, mixed, g, mixed_g = both[:batch], both[batch:], both_g[:batch], both_g[batch:]
            mixed = mixed + mixing.mix_tokens(x, plan)
            if mode == "average":
                mixed = mixed / 2.0
            ratios.append(jnp.sqrt(jnp.mean(mixed**2) / jnp.mean(x**2)))
        return jnp.stack(ratios)

    return [float(r) for r in model.apply(variables, method=run)]


@pytest.mark.parametrize("mode", ["add", "average"])
def test_progressive_add_grows_with_depth_average_stays_on_scale(mode):
    ratios = _mixed_to_original_rms(mode)
    assert len(ratios) == 5
    if mode == "add":  # one more copy of the original tokens per block: 2x, 3x, ... 6x
        assert ratios[-1] > 5.0 and all(b > a + 0.5 for a, b in zip(ratios, ratios[1:]))
    else:
        assert all(0.9 < r < 1.1 for r in ratios)
