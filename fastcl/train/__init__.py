"""The SimCSE trainer: ``python -m fastcl.train`` (see :mod:`fastcl.train.cli`).

Modules: ``data`` (training files, batches, MLM masking), ``trainer`` (the step with gradient caching and DDP, evaluation,
checkpoints, resume), ``cli`` (the command line).
"""
