import os
import sys

# Tests run on the CPU in fp32 with exact matmuls unless a test says otherwise.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('MUJOCO_GL', 'egl')  # offscreen Meta-World renders; before MuJoCo loads
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
