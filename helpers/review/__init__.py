"""Reviewing answers (sections 7.7-7.9): response files, offline metrics, ratings, the LLM judge, multiple-choice benchmarks."""
