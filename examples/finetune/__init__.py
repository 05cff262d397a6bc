"""Fine-tuning example: all-MiniLM-L6-v2 (Flax NNX BERT) on UCI drug reviews.

Run ``python -m examples.finetune.quickstart`` (AdamW against MLorc-AdamW, a
few minutes on a CPU) or ``python -m examples.finetune.main --help`` (every
method, tuned learning rates). Modules, one concern each:

* :mod:`~examples.finetune.main` -- the entry point: flags, assets, study,
  outputs; :mod:`~examples.finetune.quickstart` -- the same with the
  quickstart preset.
* :mod:`~examples.finetune.config` -- the settings (a frozen dataclass, the
  command line) and the presets.
* :mod:`~examples.finetune.train` -- the training loop: the optimizer, the
  compiled train step, evaluation, one run.
* :mod:`~examples.finetune.study` -- learning-rate tuning, then the seeds.
* :mod:`~examples.finetune.methods` -- the optimizers compared, by name
  (AdamW, MLorc, Lion, GaLore, LoRA).
* :mod:`~examples.finetune.model` -- the Flax NNX BERT encoder and
  classifier; :mod:`~examples.finetune.checkpoint` -- loading Hugging Face
  weights into it.
* :mod:`~examples.finetune.data` -- drug reviews: labels, tokenisation,
  splits and batches; :mod:`~examples.finetune.assets` -- the model weights
  and the data set, fetched from the package registry into a cache.
* :mod:`~examples.finetune.report` -- tables, paired differences and the
  figure of ``results.json``.
* :mod:`~examples.finetune.pack_assets` and
  :mod:`~examples.finetune.reference_hidden_states` -- tools: move the assets
  to an offline machine; write the PyTorch reference fixture.
"""
