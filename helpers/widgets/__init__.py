"""Notebook widgets with text fallbacks: progress bars and the batch inspector."""
