"""A model that runs in CPU seconds: every code path of the 14B model at toy widths.

Variants: `configs/tiny.py:t2v` drops the image branch (16 input channels, no CLIP).
"""
from configs import base


def get_config(arg=None):
  c = base.get_base_config()
  c.model.update(dict(dim=32, num_layers=2, num_heads=2, ffn_dim=64, freq_dim=16,
                      text_dim=16, text_len=8, image_dim=12, image_tokens=5,
                      embodiment_hidden=24, num_embodiments=2, dtype='float32',
                      seq_pad_multiple=1))
  c.video.update(dict(height=64, width=64, max_chunks=4, action_horizon=8))
  c.vae.update(dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
  c.text_encoder.update(dict(vocab_size=64, dim=16, ffn_dim=32, num_heads=2, num_layers=2,
                             num_buckets=8, max_distance=16))
  c.image_encoder.update(dict(image_size=28, patch_size=14, width=12, num_layers=2,
                              num_heads=2, mlp_dim=24))
  c.data.update(dict(name='metaworld', embodiment='metaworld',
                     cameras=('corner', 'corner2', 'behindGripper'), canvas_layout='grid',
                     control_hz=80, frame_stride=1, action_dim=4, state_dim=4,
                     relative_action_dims=0))
  c.train.update(dict(steps=100, batch_size=2, checkpoint_every=50, lr=1e-3, log_every=10,
                     action_loss_norm='valid'))  # trained from scratch (the default job)
  c.sampler.update(dict(num_steps=4, dit_step_mask='1111'))
  if arg == 't2v':
    c.model.update(dict(in_channels=16, image_dim=0))
  elif arg is not None:
    raise ValueError(f'configs/tiny.py: unknown variant {arg!r} (known: t2v)')
  c.serve.update(dict(camera_height=c.video.height // 2, camera_width=c.video.width // 2))
  return c
