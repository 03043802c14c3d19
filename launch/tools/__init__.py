"""Standalone tools around training, each run as ``python -m tritower.launch.tools.<name>``:

- ``export``: consolidated weights of a checkpoint, loadable without DeepSpeed;
- ``evaluate``: zero-shot and retrieval of an export on an eval set;
- ``precompute``: a locked image tower's embeddings written once, read by training;
- ``pretrain_image``: a supervised image tower on the built-in scenes (a local "pretrained" tower);
- ``emoji_shards``: real image-caption shards of OpenMoji's emoji (the ``lit_emoji`` experiment).
"""
