"""Package metadata for flaxtune.

Runtime dependencies carry lower bounds only: flaxtune follows the current
JAX stack. The ``test`` extra holds what the test suite and the reference
implementations it compares against need; the ``hf`` extra holds the
Hugging Face PyTorch stack used by the interop parity tests. torch is pinned
to the CPU wheel that the development machines carry on local disk.
"""

from pathlib import Path

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.10.0",
    "tensorflow-datasets>=4.9.7",
    "array-record>=0.5.0",
    "grain>=0.2.2",
    "ml-collections>=0.1.1",
    "numpy>=1.26",
    "sentencepiece>=0.2.0",
    # flaxtune.data: Hugging Face tokenizer.json files (LLaMA-3, GPT-2 byte-level BPE).
    "tokenizers>=0.20",
    "safetensors>=0.4.0",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "absl-py>=2.0",
    "etils[epath]>=1.5",
    # tensorflow-datasets builds datasets through it; not pulled in without TensorFlow.
    "importlib_resources>=6.0",
    # flaxtune.eval: the Porter stemmer of ROUGE and the "intl" BLEU tokenizer.
    "nltk>=3.8",
    "regex>=2023.0",
    # flaxtune.data: chat templates (jinja2, sandboxed as Hugging Face renders them) and
    # Parquet data files (pyarrow).
    "jinja2>=3.1.6",
    "pyarrow>=14.0",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8.0",
        # The README's test command runs the suite on every core (-n auto).
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        "ruff>=0.6",
        "rouge-score==0.1.2",
        "sacrebleu>=2.4",
        "nltk>=3.8",
    ],
    "hf": [
        "torch==2.13.0",
        "transformers>=4.45",
        "peft>=0.13",
        "safetensors>=0.4.0",
    ],
}

setup(
    name="flaxtune",
    version="0.1.0",
    description=(
        "Transformers in JAX/Flax: build, fine-tune (fully or parameter-"
        "efficiently), quantize and evaluate."
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["flaxtune", "flaxtune.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
