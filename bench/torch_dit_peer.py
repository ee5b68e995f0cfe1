"""The PyTorch peer of the DiT's cached forward: what a user would run instead of this project.

A Wan2.1-14B-shaped DiT (40 blocks, width 5120, 40 heads of 128, FFN 13824) written in plain PyTorch
with SDPA, random weights in bf16, at the DROID inference shape: 1,785 new tokens (2 latent frames of
880 tokens + 24 actions + 1 state) attending to a KV cache of 7,920 tokens plus themselves, and
cross-attending to 512 text + 257 image keys precomputed per episode (the I2V branch: its own K/V,
outputs summed). Each block is the model's: LayerNorm + adaLN modulation (shift, scale, gate from a
per-token table), q/k RMSNorm and RoPE, self-attention, cross-attention (affine LayerNorm on the
query side), tanh-GELU FFN, gated residuals; the residual stream in fp32, matmuls in bf16. The
diffusers WanTransformer3DModel has no KV cache and is absent from the GPU image, so the peer is
written here; bench/kernels_gpu.py --dit runs it in the same command as the JAX forward and prints
the ratio.

  python bench/torch_dit_peer.py                      # CUDA, the 14B shape, eager and torch.compile
  python bench/torch_dit_peer.py --device cpu --layers 2 --dim 96 --heads 4 --ffn 64 --new_tokens 13 \\
      --cached 40 --text 8 --image 4 --no_compile     # a smoke run on the CPU

Prints one line per (mode, B): `torch eager B=1 q=1785 kv=7920: 135.8 ms` (median of --repeats after
two warm-ups; CUDA events on a GPU, a host clock on the CPU).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _weights(layers: int, dim: int, ffn: int, device: str, generator: torch.Generator) -> list[dict]:
  def w(*shape, std=None):
    std = std if std is not None else shape[0] ** -0.5
    return (torch.randn(*shape, device=device, generator=generator) * std).to(torch.bfloat16)

  names = ('q', 'k', 'v', 'o', 'cq', 'co')
  return [dict(**{n: w(dim, dim) for n in names}, f1=w(dim, ffn), f2=w(ffn, dim),
               mod=torch.randn(6, dim, device=device, generator=generator) * dim ** -0.5,
               norm_q=torch.ones(dim, device=device), norm_k=torch.ones(dim, device=device),
               norm_cq=torch.ones(dim, device=device), norm3=torch.ones(dim, device=device))
          for _ in range(layers)]


def _rms(x, scale, eps=1e-6):
  x32 = x.float()
  return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * scale).to(torch.bfloat16)


def _rope(x, cos, sin):
  """x [B, T, H, Dh] bf16, rotating interleaved pairs (as Wan) by angles [T, Dh/2]."""
  x32 = x.float().unflatten(-1, (-1, 2))
  a, b = x32[..., 0], x32[..., 1]
  c, s = cos[None, :, None], sin[None, :, None]
  return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).to(torch.bfloat16)


def make_forward(params: list[dict], heads: int):
  def forward(x, e, cos, sin, cache_k, cache_v, text_k, text_v, image_k, image_v):
    """x [B, T, D] fp32; e [B, T, 6, D] fp32 modulation rows; caches lists per layer [B, Lc, H, Dh]."""
    b, t, d = x.shape
    hd = d // heads
    split = lambda y: y.view(b, t, heads, hd).transpose(1, 2)
    for i, p in enumerate(params):
        m = p['mod'] + e
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + m[:, :, 1]) + m[:, :, 0]
        h = h.to(torch.bfloat16)
        q = _rope(_rms(h @ p['q'], p['norm_q']).view(b, t, heads, hd), cos, sin)
        k = _rope(_rms(h @ p['k'], p['norm_k']).view(b, t, heads, hd), cos, sin)
        v = (h @ p['v']).view(b, t, heads, hd)
        keys = torch.cat([cache_k[i], k], 1).transpose(1, 2)
        values = torch.cat([cache_v[i], v], 1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values).transpose(1, 2).reshape(b, t, d)
        x = x + (a @ p['o']).float() * m[:, :, 2]
        h = (F.layer_norm(x, (d,), eps=1e-6) * p['norm3']).to(torch.bfloat16)
        cq = split(_rms(h @ p['cq'], p['norm_cq']))
        a = (F.scaled_dot_product_attention(cq, text_k[i].transpose(1, 2), text_v[i].transpose(1, 2))
             + F.scaled_dot_product_attention(cq, image_k[i].transpose(1, 2), image_v[i].transpose(1, 2)))
        x = x + (a.transpose(1, 2).reshape(b, t, d) @ p['co']).float()
        h = (F.layer_norm(x, (d,), eps=1e-6) * (1 + m[:, :, 4]) + m[:, :, 3]).to(torch.bfloat16)
        x = x + (F.gelu(h @ p['f1'], approximate='tanh') @ p['f2']).float() * m[:, :, 5]
    return x
  return forward


def timed_ms(fn, args, repeats: int, device: str) -> float:
  with torch.no_grad():
    for _ in range(2):
      fn(*args)
    times = []
    for _ in range(repeats):
      if device == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
      else:
        start = time.perf_counter()
        fn(*args)
        times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'))
  parser.add_argument('--layers', type=int, default=40)
  parser.add_argument('--dim', type=int, default=5120)
  parser.add_argument('--heads', type=int, default=40)
  parser.add_argument('--ffn', type=int, default=13824)
  parser.add_argument('--new_tokens', type=int, default=1785)
  parser.add_argument('--cached', type=int, default=7920)
  parser.add_argument('--text', type=int, default=512)
  parser.add_argument('--image', type=int, default=257)
  parser.add_argument('--batches', type=int, nargs='+', default=(1, 2))
  parser.add_argument('--repeats', type=int, default=8)
  parser.add_argument('--no_compile', action='store_true', help='eager only (torch.compile needs a compiler)')
  args = parser.parse_args(argv)
  if args.dim % args.heads or (args.dim // args.heads) % 2:
    raise SystemExit(f'--dim {args.dim} must split into --heads {args.heads} heads of even width')
  if args.device == 'cuda' and not torch.cuda.is_available():
    print('no CUDA device: run with --device cpu for a smoke run', file=sys.stderr)
    return 2
  torch.backends.cuda.matmul.allow_tf32 = True
  dev, d, hd = args.device, args.dim, args.dim // args.heads
  g = torch.Generator(device=dev).manual_seed(0)
  params = _weights(args.layers, d, args.ffn, dev, g)
  forward = make_forward(params, args.heads)
  modes = [('torch eager', forward)] + ([] if args.no_compile else [('torch.compile', torch.compile(forward))])
  angles = torch.rand(args.new_tokens, hd // 2, device=dev, generator=g) * 100
  kv = lambda b, n: [(torch.randn(b, n, args.heads, hd, device=dev, generator=g)).to(torch.bfloat16)
                     for _ in range(args.layers)]
  for b in args.batches:
    inputs = (torch.randn(b, args.new_tokens, d, device=dev, generator=g),
              torch.randn(b, args.new_tokens, 6, d, device=dev, generator=g) * 0.1,
              torch.cos(angles), torch.sin(angles), kv(b, args.cached), kv(b, args.cached),
              kv(b, args.text), kv(b, args.text), kv(b, args.image), kv(b, args.image))
    for name, fn in modes:
      try:
        ms = timed_ms(fn, inputs, args.repeats, dev)
      except Exception as e:  # torch.compile can fail on a machine's toolchain: say so, keep the eager figure
        print(f'{name} B={b} failed: {type(e).__name__}: {str(e)[:200]}')
        continue
      print(f'{name} B={b} q={args.new_tokens} kv={args.cached}: {ms:.1f} ms', flush=True)
    del inputs
  return 0


if __name__ == '__main__':
  sys.exit(main())
