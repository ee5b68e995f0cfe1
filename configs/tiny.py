"""A model that runs in CPU seconds: every code path of the 14B model at toy widths.

Variants: `configs/tiny.py:t2v` drops the image branch (16 input channels, no CLIP);
`configs/tiny.py:droid` is a DROID robot: its 3 cameras on the droid canvas, state 8, action 8 with
the 7 joints relative, 24 actions a chunk at 15 Hz, stride 3 (what tests serve as a DROID policy).
"""
from configs import base
from dreamzero_jax import embodiments

# Wan's own (Chinese) default negative prompt, kept for the toy model: its tests were tuned with it
# (8 byte tokens of prompt). The DreamZero configs use the release's English one (base.py).
WAN_NEGATIVE_PROMPT = (
    '色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，'
    '丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，'
    '杂乱的背景，三条腿，背景人很多，倒着走')


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
  c.data.update(dict(name='metaworld', **embodiments.data_config('metaworld'),
                     # No crop: the 64x64 views are small; mild jitter as before.
                     augment_crop_scale=1.0, augment_brightness=0.1, augment_contrast=0.1,
                     augment_saturation=0.0, augment_hue=0.0))
  c.train.update(dict(steps=100, batch_size=2, checkpoint_every=50, lr=1e-3, log_every=10,
                     action_loss_norm='valid'))  # trained from scratch (the default job)
  c.sampler.update(dict(num_steps=4, dit_step_mask='1111', negative_prompt=WAN_NEGATIVE_PROMPT))
  if arg == 't2v':
    c.model.update(dict(in_channels=16, image_dim=0))
  elif arg == 'droid':
    c.data.update(dict(name='droid', **embodiments.data_config('droid')))
    c.video.update(dict(height=32, width=64, max_chunks=2, action_horizon=24))
    # Served as the release serves DROID (its sampler, per-call encode and unsmoothed actions), with
    # the gripper binarised on the server by its DROID client's rule (> 0.5).
    c.postprocess.gripper_dims = (7,)
  elif arg is not None:
    raise ValueError(f'configs/tiny.py: unknown variant {arg!r} (known: t2v, droid)')
  c.serve.update(dict(camera_height=c.video.height // 2, camera_width=c.video.width // 2))
  if arg != 'droid':
    base.serve_as_trained(c)   # README, "Fidelity to the official release"
  return c
