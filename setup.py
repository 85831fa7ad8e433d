"""Installs mixreorg_jax: `pip install -e .` (add `[test]` for the test suite)."""

import setuptools

setuptools.setup(
    name="mixreorg_jax",
    version="0.1.0",
    description="MixReorg / GroupViT text-supervised open-world segmentation in JAX/Flax.",
    # The repository's configs/ ship as mixreorg_jax.configs, so `--config configs/x.py` also
    # works from an installed package (training.config.resolve finds them there).
    packages=setuptools.find_packages(include=["mixreorg_jax", "mixreorg_jax.*"])
    + ["mixreorg_jax.configs", "mixreorg_jax.configs.eval"],
    package_dir={"mixreorg_jax.configs": "configs"},
    package_data={"mixreorg_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "grain",
        "array_record",
        "tensorflow-datasets",
        "tensorflow-cpu",
        "tensorboard",
        "ml_collections",
        "clu",
        "transformers>=4.40",
        "safetensors",
        "ftfy",
        "regex",
        "nltk",
        "pyarrow",
        "importlib_resources",
        "pillow",
        "numpy",
        "matplotlib",
        "absl-py",
    ],
    extras_require={
        # torch==2.13.0 is the CPU build available locally; the reference for numerical parity.
        # img2dataset fetches the paper smoke test's images (tests/test_paper.py); jax[tpu]'s
        # libtpu compiles for a TPU slice without one (`benchmark --topology`).
        "test": [
            "torch==2.13.0",
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "ruff==0.17.6",
            "img2dataset==1.47.0",
            "jax[tpu]",
        ],
    },
)
