"""Running a model: teacher feature cache, training, evaluation, calibration, checkpoints,
devices and distributed training, and the benchmark runner."""
