"""Meta-World on a laptop-class CPU: a small DreamZero that learns in minutes on 2 cores.

Every lever toward few tokens and fast steps: a 64x64 canvas of three 32x32 views (16 tokens per
latent frame),
frozen encoders run once per clip (data.latent_cache), clips anchored on the replanning grid
(data.anchor_stride = the action horizon), no CLIP branch (the I2V condition carries frame 0),
and no classifier-free guidance (the prompt is not dropped in training, so an unconditional
branch would only cost time).

Variants: `:quick` is the default job (python -m dreamzero_jax.quickstart): fewer DiT steps, 2 chunks
of context (17-frame clips) and a VAE trained harder on them (28 dB held-out in ~8 minutes).

The recipe (bench/RESULTS.md "The CPU recipe": 43.5 min of training on 2 cores, 0.85 success on new
variations of its 5 tasks against 0.03 for a random policy):

  python -m dreamzero_jax.quickstart --config configs/metaworld_cpu.py --out runs/recipe \
      --tasks plate-slide-v3,plate-slide-back-v3,drawer-close-v3,door-close-v3,faucet-close-v3 \
      --episodes 30 --eval_episodes 20 --unseen_tasks ml45 --baselines --max_minutes 46
"""
from configs import base
from dreamzero_jax import embodiments


def get_config(arg=None):
  c = base.get_base_config()
  c.model.update(dict(dim=128, num_layers=4, num_heads=4, ffn_dim=512, freq_dim=64,
                      text_dim=16, text_len=16, image_dim=0, in_channels=36,
                      embodiment_hidden=128, num_embodiments=2, dtype='float32', seq_pad_multiple=1))
  # 8 frames and 8 actions per chunk (one frame per control step), 4 chunks of context.
  c.video.update(dict(height=64, width=64, frames_per_chunk=8, max_chunks=4, action_horizon=8))
  c.vae.update(dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
  # The small VAE trained here first (training/vae_training.py; docs/small_scale.md): ~0.33 s per update.
  c.vae_train.update(dict(steps=2000))
  c.text_encoder.update(dict(vocab_size=384, dim=16, ffn_dim=32, num_heads=2, num_layers=2,
                             num_buckets=8, max_distance=16))
  c.data.update(embodiments.data_config('metaworld'))   # cameras, dims, rate, stride 1
  c.data.update(dict(name='metaworld', anchor_stride=8, latent_cache=True,
                     # The cache holds unaugmented clips: no crop, no jitter.
                     augment_crop_scale=1.0, augment_brightness=0.0, augment_contrast=0.0,
                     augment_saturation=0.0, augment_hue=0.0))
  c.train.update(dict(steps=8000, batch_size=8, checkpoint_every=1000, lr=1e-3, log_every=50,
                      action_loss_norm='valid'))   # trained from scratch: the 4 real action dims
  c.sampler.update(dict(num_steps=4, dit_step_mask='1111', cfg_scale=1.0))
  c.serve.update(dict(camera_height=c.video.height // 2, camera_width=c.video.width // 2))
  base.serve_as_trained(c)   # README, "Fidelity to the official release"
  if arg == 'quick':
    # Minutes, not an hour: 2 chunks of context (17-frame clips: the VAE's updates cost half) and a
    # VAE trained at a higher rate for more updates: 28.5 dB held-out in 8 minutes, where 900 updates
    # on 33-frame clips gave 24.8 (bench/RESULTS.md "The small VAE"; docs/small_scale.md).
    c.video.update(dict(max_chunks=2))
    c.vae_train.update(dict(steps=3000, lr=4e-3))
    c.train.update(dict(steps=1200, checkpoint_every=400))
  elif arg is not None:
    raise ValueError(f'configs/metaworld_cpu.py: unknown variant {arg!r} (known: quick)')
  return c
