"""The data layer's error type, in a module of its own so that code which only raises it (the VAE's
training objective, say) imports without the dataset readers (TFDS, Grain)."""


class DataError(ValueError):
  """Input data that does not match what its dataset declares; the message names the field."""
