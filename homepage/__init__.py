"""The ``homepage`` command line: the one entry point above ``agent``, ``finetune`` and ``eval``
(nothing below it imports upward)."""
