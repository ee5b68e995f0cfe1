"""dreamzero-jax: the DreamZero World Action Model in JAX."""
import os as _os

# XLA's CPU backend in jaxlib 0.10 runs large fp32 dots through its experimental YNNPACK fusions,
# which crash (SIGSEGV in ynn::dot_fp32 on an XLA Eigen thread) on the Meta-World train step at its
# own batch of 16 (bench/RESULTS.md, 2026-11-28). XLA's own dot emitter runs it. Read when the
# backend starts, so this must precede the first computation; a user's own setting wins.
if 'xla_cpu_experimental_ynn_fusion_type' not in _os.environ.get('XLA_FLAGS', ''):
  _os.environ['XLA_FLAGS'] = (_os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_experimental_ynn_fusion_type=').strip()
