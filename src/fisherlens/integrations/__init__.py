"""Plug fisherlens into the tools training already runs in.

* :mod:`fisherlens.integrations.loggers` — the logger protocol of :class:`fisherlens.Monitor` (any callable
  ``log(values: dict[str, float], step: int)``) and :class:`~fisherlens.integrations.loggers.TensorBoardLogger`.
* :mod:`fisherlens.integrations.lightning` — ``FisherCallback``, a PyTorch Lightning ``Callback``
  (needs ``lightning``).
* :mod:`fisherlens.integrations.transformers` — ``FisherCallback``, a Hugging Face ``TrainerCallback``
  (needs ``transformers``).

Nothing here is imported by ``import fisherlens``: each submodule imports its framework when it is imported
itself and raises an ``ImportError`` naming the package to install when the framework is absent.
"""
