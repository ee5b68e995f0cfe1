"""The data's error type, in a foundations module of its own so that the embodiment registry and code
which only raises it (the VAE's training objective, say) import without the dataset readers (TFDS, Grain)."""


class DataError(ValueError):
  """Input data that does not match what its dataset declares; the message names the field."""
