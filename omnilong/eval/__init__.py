"""Evaluation: held-out loss and perplexity; NIAH, V-NIAH and VideoMME arrive with their issue."""
