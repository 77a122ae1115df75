"""LLM-judge suites: criteria, known-answer cases, judges, statistics and reports (``homepage eval judge``)."""
