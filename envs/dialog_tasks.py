"""Multi-turn text tasks with verifiable rewards, and a tiny chat model to learn them on a CPU.

Registry (``DIALOG_TASKS``, read by ``rebel train text --env NAME``):

* ``"guess-number"``: guess a hidden number; a judge answers ``higher`` / ``lower`` /
  ``correct`` and lies (flips higher/lower) with probability ``lie_prob``.
* ``"calculator"``: an arithmetic question; the agent calls ``calc(12*7)``, the tool
  answers ``84``, and ``answer: 84`` ends the episode.

Each entry is a :class:`DialogTask`: ``make_env()`` builds one environment (a
``rebel.text.env.TextEnv``), ``make_model()`` the warmed-up tiny model and its tokenizer,
``dataset`` the opening rows (or None), ``text_config`` suggested TextConfig overrides,
``optimum`` the best expected return when known.
"""
