"""Official checkpoint names -> our parameters: one key map per model ({dit,vae,clip,umt5}_keys.py;
common.py: Target, load_tensors), the converted-release reader (release.py) that `convert` writes for,
and the official Wan code imported as an independent reference (wan_reference.py)."""
