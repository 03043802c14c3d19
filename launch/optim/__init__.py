"""The optimizer and its learning-rate schedule: the ``optim`` section and their builders."""
