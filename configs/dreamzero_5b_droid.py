"""The 5B ablation: Wan2.2-TI2V-5B backbone (z48 VAE, no CLIP branch) on DROID."""
from configs import base


def get_config(arg=None):
  del arg
  c = base.get_base_config()
  c.model.update(dict(dim=3072, num_layers=30, num_heads=24, ffn_dim=14336,
                      in_channels=48, out_channels=48, image_dim=0))
  c.video.update(dict(height=320, width=640, vae_spatial=16, latent_channels=48))
  c.vae.update(dict(kind='wan2.2', z_dim=48, base_dim=160, decoder_base_dim=256))
  return c
