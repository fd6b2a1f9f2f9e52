"""qponder_jax: Q-Ponder (reasoning-based image quality assessment) in JAX/Flax."""

from setuptools import find_packages, setup

# Pinned versions: the set tested together in CI. Everything the package imports at run time, directly or through a
# library's optional path we use (jinja2: transformers' chat templates), is listed here; tests/test_install.py and
# `.ci/run`'s bare install check it.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "ml-dtypes==0.7.0",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "etils==1.15.0",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "jinja2==3.1.6",
    "safetensors==0.8.0",
    "einops==0.8.2",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "pillow==13.0.0",
    "openpyxl==3.1.5",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    "av==18.1.0",
]

EXTRAS_REQUIRE = {
    # torch is a reference for tests and benchmarks only; the package never imports it at run time.
    "test": [
        "torch==2.13.0",
        "pytest==9.0.3",
        "hypothesis==6.155.2",
        "ruff==0.17.6",
    ],
    # the GRPO benchmark's reference side (TRL's GRPOTrainer); `python -m qponder_jax.bench grpo` skips it without
    "bench": [
        "trl==1.16.0",
        "accelerate==1.15.0",
        "datasets==5.2.0",
    ],
}

setup(
    name="qponder_jax",
    version="0.1.0",
    description="Q-Ponder reasoning-based image quality assessment: Qwen2.5-VL in JAX/Flax, SFT and GRPO.",
    packages=find_packages(include=["qponder_jax", "qponder_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["qponder=qponder_jax.main:run", "qponder-score=qponder_jax.score:main"]},
)
