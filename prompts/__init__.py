"""Prompt templates (.jinja) and the rule and skeleton files (.yaml): data that merchandisers edit.
Loading and checking them is the agent's job (agent.prompting, agent.rules, agent.skeleton)."""

from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent
