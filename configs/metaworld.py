"""Meta-World on one GPU: configs/metaworld_cpu.py's recipe scaled up (128x128 canvas of 64x64 views,
a 256-wide DiT, all 45 ML45 train tasks). One command builds the data, trains the small VAE and the
policy, and evaluates it beside the scripted expert and a random policy (docs/small_scale.md):

  python -m dreamzero_jax.quickstart --config configs/metaworld.py --tasks ml45 --unseen_tasks ml45 \
      --episodes 50 --eval_episodes 20 --eval_steps 300 --replay 20 --baselines --out runs/metaworld_ml45
"""
from configs import base
from dreamzero_jax import embodiments


def get_config(arg=None):
  del arg
  c = base.get_base_config()
  c.model.update(dict(dim=256, num_layers=4, num_heads=4, ffn_dim=1024, freq_dim=256,
                      text_dim=16, text_len=32, image_dim=0, in_channels=16,
                      embodiment_hidden=256, num_embodiments=2))
  # 128x128 canvas of 64x64 views; 80 Hz control, a frame every 2 steps, 16-step chunks (0.2 s).
  c.video.update(dict(height=128, width=128, frames_per_chunk=8, max_chunks=4,
                      action_horizon=16))
  c.data.update(embodiments.data_config('metaworld'))
  c.data.update(dict(dir='', name='metaworld',
                     frame_stride=2,   # a frame every 2 control steps (the embodiment's default: every step)
                     # Frozen encoders run once per clip (data.latent_cache) on clips anchored where the
                     # policy replans; the cache holds unaugmented clips: no crop, no jitter.
                     anchor_stride=16, latent_cache=True,
                     augment_crop_scale=1.0, augment_brightness=0.0, augment_contrast=0.0,
                     augment_saturation=0.0, augment_hue=0.0))
  # The VAE is trained on the dataset's frames first (training/vae_training.py; the quickstart does it and
  # sets init.vae); umT5 stays random and frozen (distinct prompts still embed distinctly).
  c.vae.update(dict(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
  c.text_encoder.update(dict(vocab_size=384, dim=16, ffn_dim=32, num_heads=2, num_layers=2,
                             num_buckets=8, max_distance=16))
  # Trained from scratch: the action loss is averaged over its 4 real dims, not the 32 padded ones.
  c.train.update(dict(steps=20_000, batch_size=16, checkpoint_every=1000, lr=1e-4, action_loss_norm='valid'))
  c.sampler.update(dict(num_steps=4, dit_step_mask='1111', cfg_scale=1.0))
  c.serve.update(dict(camera_height=c.video.height // 2, camera_width=c.video.width // 2))
  base.serve_as_trained(c)   # README, "Fidelity to the official release"
  return c
