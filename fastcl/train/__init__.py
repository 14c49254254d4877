"""The SimCSE trainer: ``python -m fastcl.train`` (see :mod:`fastcl.train.cli`).

Modules: ``config`` (the options), ``data`` (training files, batches, MLM masking),
``step`` (one step's gradients, gradient caching, DDP, MoCo), ``optimizer`` (AdamW and
the schedule), ``trainer`` (set-up and the loop), ``stopping`` (Ctrl-C and SIGTERM during
the loop), ``evaluation`` (STS-B during training, the final model, results),
``checkpoint`` (all-or-nothing checkpoint files), ``resume`` (writing, applying and
recovering around a checkpoint), ``output`` (the output directory's checks), ``fisher``
(Child-Tuning-D's mask), ``cli`` (the command line). The model itself is
:mod:`fastcl.sentence_model`, saved and loaded by :mod:`fastcl.saved_model`.
"""
