"""Evaluation: figures and media that show what a model did."""
