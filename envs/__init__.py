"""The project's own environments: exact tabular MDPs and bandits, text tasks with verifiable rewards."""
