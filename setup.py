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
    # Ranges, for installing into an environment of one's own: lower bounds are the releases that
    # brought the APIs used here (not tested), upper bounds the next major release. The tests
    # pass on the exact versions of requirements.lock / requirements-test.lock, which the
    # README's commands install.
    install_requires=[
        "jax>=0.7,<1",
        "flax>=0.10,<1",
        "optax>=0.2.4,<1",
        "orbax-checkpoint>=0.11,<1",
        "grain>=0.2.12,<1",
        "array_record>=0.7,<1",
        "tensorflow-datasets>=4.9.7,<5",
        "tensorflow-cpu>=2.18,<3",
        "tensorboard>=2.18,<3",
        "ml_collections>=1.0,<2",
        "clu>=0.0.12",
        "transformers>=4.40,<6",
        "safetensors>=0.4,<1",
        "ftfy>=6,<7",
        "regex",
        "nltk>=3.9,<4",
        "pyarrow>=14",
        "importlib_resources",
        "pillow>=10",
        "numpy>=1.26,<3",
        "matplotlib>=3.8,<4",
        "absl-py>=2,<3",
    ],
    extras_require={
        # Data preparation on Apache Beam (`prepare_captions --beam_runner`); Dataflow also needs
        # `apache-beam[gcp]`.
        "beam": ["apache-beam>=2.77,<3"],
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
            "apache-beam==2.77.0",
        ],
    },
)
