"""TFDS builders, one folder per dataset; each writes our stacked-episode format (episodes.py)."""
