"""The DeepSpeed engine and its policy: the ``deepspeed`` section, the filled ZeRO config, fused
kernels and exact accumulation (GradCache)."""
