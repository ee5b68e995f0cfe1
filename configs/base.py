"""Shared defaults: the Wan2.1-I2V-14B DreamZero model on DROID (dreamzero_jax/defaults.py, where the
package also reads them: a checkpoint's stored config is filled in over them). Other configs override fields.
"""
from dreamzero_jax.defaults import DREAMZERO_NEGATIVE_PROMPT, get_base_config  # noqa: F401
