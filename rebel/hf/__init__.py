"""The front end shared by the Hugging Face worlds (``rebel.text`` and ``rebel.diffusion``):
a trainer that builds on :class:`rebel.Trainer` and saves the model at the end
(:mod:`rebel.hf.trainer`), and the command-line glue of ``rebel train text|diffusion``
(:mod:`rebel.hf.cli`). It depends on the core only; the worlds depend on it, never on each other.
"""
