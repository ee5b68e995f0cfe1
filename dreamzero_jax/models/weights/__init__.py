"""Official checkpoint names -> our parameters: one key map per model (common.py: Target, load_tensors),
and the converted-release reader (release.py) that `convert` writes for."""
