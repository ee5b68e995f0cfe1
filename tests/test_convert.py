"""`dreamzero_jax.convert`: tiny official-format checkpoints written here (DiT in official names as .pth
and in diffusers names as sharded safetensors, the VAE in official and diffusers names, umT5 and CLIP in
Wan names, a DreamZero full checkpoint), converted, loaded and run against the PyTorch references.
The reference constructions come from the parity tests of each model."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from dreamzero_jax import convert, settings, torch_files
from dreamzero_jax.checkpoint import IncompatibleCheckpointError
from dreamzero_jax.config import load_config
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.models.encoders import FrozenEncoders, with_params
from dreamzero_jax.models.weights import dit_keys
from dreamzero_jax.models.weights import release
from dreamzero_jax.models.weights.common import WeightMismatchError
from tests import test_clip, test_dit_parity, test_umt5, test_vae
from tests.test_clip import reference  # noqa: F401  (the CLIP reference fixture)
from tests.wan_reference import import_wan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = pytest.mark.parametrize('reference', ['tiny'], indirect=True)


def _cfg(*overrides):
  return load_config(os.path.join(ROOT, 'configs/tiny.py'), list(overrides))


def _numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _round_to_bf16(module: torch.nn.Module) -> None:
  """Weights exactly representable in bf16, so a bf16 file converts to the fp32 reference bit for bit."""
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(p.to(torch.bfloat16).float())


def _save_pth(path, tensors: dict, dtype=torch.float32) -> str:
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in tensors.items()}, path)
  return str(path)


def _save_sharded(directory, tensors: dict, shards: int = 2) -> str:
  """A Hugging Face sharded safetensors checkpoint (diffusion_pytorch_model-0000i-of-0000n + index)."""
  keys = list(tensors)
  weight_map = {}
  for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
    name = f'diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors'
    save_file({keys[j]: np.ascontiguousarray(tensors[keys[j]]) for j in part}, os.path.join(directory, name))
    weight_map.update({keys[j]: name for j in part})
  index = os.path.join(directory, 'diffusion_pytorch_model.safetensors.index.json')
  with open(index, 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  return index


def _action_modules(m, seed: int) -> dict[str, np.ndarray]:
  """DreamZero's action/state modules in the release's names, one shared set (E = 1)."""
  shapes = {'action_encoder.W1': (m.action_dim, m.dim), 'action_encoder.W2': (2 * m.dim, m.dim),
            'action_encoder.W3': (m.dim, m.dim), 'state_encoder.layer1': (m.state_dim, m.embodiment_hidden),
            'state_encoder.layer2': (m.embodiment_hidden, m.dim),
            'action_decoder.layer1': (m.dim, m.embodiment_hidden),
            'action_decoder.layer2': (m.embodiment_hidden, m.action_dim)}
  rng = np.random.default_rng(seed)
  out = {}
  for name, (din, dout) in shapes.items():
    out[f'{name}.W'] = rng.standard_normal((1, din, dout)).astype(np.float32)
    out[f'{name}.b'] = rng.standard_normal((1, dout)).astype(np.float32)
  return out


class References:
  """Tiny random PyTorch references for configs/tiny.py and their checkpoints in the official formats."""

  def __init__(self, directory, clip_reference):
    from diffusers import WanTransformer3DModel
    self.dir = directory
    self.cfg = _cfg()
    m = self.cfg.model
    self.dit = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=m.num_heads, attention_head_dim=m.dim // m.num_heads,
        in_channels=m.in_channels, out_channels=m.out_channels, text_dim=m.text_dim, freq_dim=m.freq_dim,
        ffn_dim=m.ffn_dim, num_layers=m.num_layers, cross_attn_norm=True, image_dim=m.image_dim,
        added_kv_proj_dim=m.dim).eval()
    test_dit_parity._randomize(self.dit, 1)
    self.vae_official = test_vae._reference(self.cfg.vae, 'official')
    test_vae._randomize(self.vae_official, 2)
    self.vae_diffusers = test_vae._reference(self.cfg.vae, 'diffusers')
    test_vae._randomize(self.vae_diffusers, 3)
    t = self.cfg.text_encoder
    self.t5 = import_wan('modules.t5').T5Encoder(
        vocab=t.vocab_size, dim=t.dim, dim_attn=t.dim, dim_ffn=t.ffn_dim, num_heads=t.num_heads,
        num_layers=t.num_layers, num_buckets=t.num_buckets, shared_pos=False).eval()
    for block in self.t5.blocks:
      block.pos_embedding.max_dist = t.max_distance
    test_umt5._randomize(self.t5, 4, t.dim // t.num_heads)
    _round_to_bf16(self.t5)
    clip_cfg, clip_state, self.clip_pixels, self.clip_want = clip_reference
    assert clip_cfg.to_dict() == self.cfg.image_encoder.to_dict()
    self.clip_wan_names = test_clip._wan_names(clip_state, clip_cfg.num_layers)

    dit = _numpy(self.dit)
    self.dit_official = {dit_keys.diffusers_to_wan_key(k): v for k, v in dit.items()}
    official = os.path.join(directory, 'official')
    diffusers = os.path.join(directory, 'diffusers')
    os.makedirs(official)
    os.makedirs(diffusers)
    self.official_sources = [
        _save_pth(os.path.join(official, 'dit.pth'), self.dit_official),
        _save_pth(os.path.join(official, 'Wan2.1_VAE.pth'), _numpy(self.vae_official)),
        _save_pth(os.path.join(official, 'models_t5_umt5-xxl-enc-bf16.pth'), _numpy(self.t5), torch.bfloat16),
        # The action/state modules, so the conversion has a real embodiment row (tiny's, 1) to serve.
        _save_pth(os.path.join(official, 'action_modules.pth'), _action_modules(self.cfg.model, 11)),
        _save_pth(os.path.join(official, 'models_clip.pth'), self.clip_wan_names),
    ]
    vae_file = os.path.join(diffusers, 'vae.safetensors')
    save_file({k: np.ascontiguousarray(v) for k, v in _numpy(self.vae_diffusers).items()}, vae_file)
    self.diffusers_sources = [_save_sharded(diffusers, dit), vae_file] + self.official_sources[2:]


@pytest.fixture(scope='module')
def refs(tmp_path_factory, reference):  # noqa: F811
  return References(str(tmp_path_factory.mktemp('sources')), reference)


@pytest.fixture(scope='module')
def official(refs):
  out = os.path.join(refs.dir, 'converted_official')
  convert.convert(refs.cfg, refs.official_sources, out)
  return out


@pytest.fixture(scope='module')
def official_params(refs, official):
  return release.load_converted(official, settings.from_config(refs.cfg))


def _models(cfg, dit_params, enc_params):
  dit = with_params(nnx.eval_shape(lambda: build_dit(cfg.model, rngs=nnx.Rngs(0))), dit_params)
  encoders = with_params(nnx.eval_shape(lambda: FrozenEncoders(settings.from_config(cfg), rngs=nnx.Rngs(0))),
                         enc_params)
  return dit, encoders


def _check_dit(refs, dit):
  """The I2V forward with the image branch, as in test_dit_parity.test_matches_diffusers."""
  m = refs.cfg.model
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, m.in_channels, 3, 4, 4)).astype(np.float32)
  t = np.array([10.0, 640.0], np.float32)
  text = rng.standard_normal((2, 512, m.text_dim)).astype(np.float32)  # diffusers I2V splits at 512
  img = rng.standard_normal((2, m.image_tokens, m.image_dim)).astype(np.float32)
  with torch.no_grad():
    want = refs.dit(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text),
                    encoder_hidden_states_image=torch.from_numpy(img)).sample.numpy().transpose(0, 2, 3, 4, 1)
  got = dit.wan_forward(jnp.asarray(x.transpose(0, 2, 3, 4, 1)), jnp.asarray(t), jnp.asarray(text), jnp.asarray(img))
  assert test_dit_parity._rel(got, want) < 1e-5


def _check_vae(ref, model, seed):
  video = test_vae._video(seed, t=5)
  want = test_vae._encode_ref(ref, video, 'wan2.1')
  got = jax.jit(model.encode)(jnp.asarray(video))
  assert got.shape == want.shape
  assert test_vae._rel_err(got, want) < 1e-5


@TINY_CLIP
def test_official_names_convert_to_the_reference_outputs(refs, official, official_params):
  assert sorted(os.listdir(official)) == ['config.json', 'manifest.json', 'params']
  assert not glob.glob(official + '.tmp-*')
  dit, encoders = _models(refs.cfg, *official_params)
  _check_dit(refs, dit)
  _check_vae(refs.vae_official, encoders.vae, seed=1)
  ids, lengths, mask = test_umt5._inputs(refs.cfg.text_encoder.vocab_size, 'tiny')
  with torch.no_grad():
    want = refs.t5(torch.from_numpy(ids).long(), mask).numpy()
  test_umt5._check(np.asarray(encoders.text(jnp.asarray(ids), jnp.asarray(lengths))), want, lengths)
  test_clip._assert_close(np.asarray(encoders.image(jnp.asarray(refs.clip_pixels))), refs.clip_want)
  # A plain Wan checkpoint has no action/state modules: rows no source fills keep the model's
  # initialisation (row 0 here; row 1, tiny's embodiment, holds action_modules.pth's shared set).
  kernel = np.asarray(dit.action_encoder.w2.kernel[...])
  assert 0.015 < kernel[0].std() < 0.025
  assert not np.asarray(dit.action_encoder.w2.bias[...])[0].any()
  np.testing.assert_array_equal(kernel[1], _action_modules(refs.cfg.model, 11)['action_encoder.W2.W'][0])


@TINY_CLIP
def test_training_and_serving_use_the_converted_weights(refs, official, official_params, tmp_path):
  # init.converted: a fresh run starts the DiT from the converted weights (lr 0 keeps them), the
  # frozen encoders are the converted ones in training and in the policy loaded from the workdir.
  from dreamzero_jax.models import encoders
  from dreamzero_jax.serving.loading import load_policy
  from dreamzero_jax.training import loop
  from tests.helpers import ListIterator, synthetic_batches
  cfg = _cfg(f'init.converted={official}', 'train.steps=1', 'train.lr=0.0', 'train.warmup_fraction=0.0',
             'video.max_chunks=2', 'video.height=32', 'video.width=32')
  want_dit, want_enc = official_params
  same = lambda got, want: jax.tree.map(np.testing.assert_array_equal, got, want)
  same(nnx.state(encoders.build_frozen_encoders(settings.from_config(cfg)), nnx.Param).to_pure_dict(), want_enc)
  stats = {'state': dict(q01=[-1.0] * 4, q99=[1.0] * 4), 'action': dict(q01=[-1.0] * 4, q99=[1.0] * 4)}
  workdir = str(tmp_path / 'run')
  assert loop.train(cfg, workdir, data=ListIterator(synthetic_batches(cfg)), norm_stats=stats) == 0
  policy = load_policy(workdir)
  assert policy.settings.init.converted == official
  same(policy._model_state.to_pure_dict(), want_dit)
  same(policy._enc_state.to_pure_dict(), want_enc)
  # Without it, the encoders are random (and differ from the converted ones).
  random = nnx.state(encoders.build_frozen_encoders(settings.from_config(_cfg())), nnx.Param).to_pure_dict()
  assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(random['vae']), jax.tree.leaves(want_enc['vae']))
                 if np.asarray(a).std() > 0)


@TINY_CLIP
def test_a_converted_checkpoint_serves_with_norm_stats(refs, official, official_params, tmp_path):
  from dreamzero_jax.datasets import normalization
  from dreamzero_jax.serving import loading as policy_lib
  with pytest.raises(ValueError, match='carries no normalisation statistics: pass --norm_stats'):
    policy_lib.load_backend(official)
  from dreamzero_jax.datasets.episodes import LowDim
  rng = np.random.default_rng(0)
  lowdim = LowDim(episode_id=np.array([b'e0']), offsets=np.array([0, 40]),
                  state=rng.standard_normal((40, 4)).astype(np.float32),
                  action=rng.standard_normal((40, 4)).astype(np.float32), language=np.zeros((40, 1), np.int32),
                  has_action=np.array([True]), success=np.array([True]))
  stats = normalization.compute_stats(lowdim, refs.cfg.video.action_horizon, refs.cfg.data.relative_action_dims)
  path = str(tmp_path / 'norm_stats.json')
  normalization.save_stats(stats, path)
  backend = policy_lib.load_backend(official, norm_stats_path=path)
  jax.tree.map(np.testing.assert_array_equal, backend.policy._model_state.to_pure_dict(), official_params[0])
  jax.tree.map(np.testing.assert_array_equal, backend.policy._enc_state.to_pure_dict(), official_params[1])
  spec = backend.metadata['observation_spec']
  first = {k: np.zeros([1, *e['shape'][1:]], e['dtype']) if len(e['shape']) == 4 else np.zeros(e['shape'], e['dtype'])
           for k, e in spec.items()}
  actions, _, _ = backend.infer(backend.new_session('reach the goal', first), first)
  assert actions.shape == tuple(backend.metadata['action_shape']) and np.isfinite(actions).all()
  bad = str(tmp_path / 'bad_stats.json')
  normalization.save_stats({**stats, 'state': {k: v[:3] for k, v in stats['state'].items()}}, bad)
  with pytest.raises(ValueError, match='state.q01 has 3 dims, the embodiment has 4'):
    policy_lib.load_backend(official, norm_stats_path=bad)


@TINY_CLIP
def test_diffusers_names_and_sharded_safetensors(refs, official_params):
  out = os.path.join(refs.dir, 'converted_diffusers')
  convert.convert(refs.cfg, refs.diffusers_sources, out)
  dit_params, enc_params = release.load_converted(out, settings.from_config(refs.cfg))
  # The same DiT as the official-names file: equal parameters, hence the reference outputs checked there.
  got, want = release.flatten(dit_params), release.flatten(official_params[0])
  assert got.keys() == want.keys()
  for path in got:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  _, encoders = _models(refs.cfg, dit_params, enc_params)
  _check_vae(refs.vae_diffusers, encoders.vae, seed=2)


@TINY_CLIP
def test_dreamzero_checkpoint_with_prefixes_and_action_modules(refs, official_params):
  """DreamZero's own full checkpoint: every module under action_head.*, one file, the action/state
  modules with one shared set (E = 1) that goes into the row --embodiment_id names."""
  m = refs.cfg.model
  rng = np.random.default_rng(7)
  shapes = {'action_encoder.W1': (m.action_dim, m.dim), 'action_encoder.W2': (2 * m.dim, m.dim),
            'action_encoder.W3': (m.dim, m.dim), 'state_encoder.layer1': (m.state_dim, m.embodiment_hidden),
            'state_encoder.layer2': (m.embodiment_hidden, m.dim),
            'action_decoder.layer1': (m.dim, m.embodiment_hidden),
            'action_decoder.layer2': (m.embodiment_hidden, m.action_dim)}
  actions = {}
  for name, (din, dout) in shapes.items():
    actions[f'{name}.W'] = rng.standard_normal((1, din, dout)).astype(np.float32)
    actions[f'{name}.b'] = rng.standard_normal((1, dout)).astype(np.float32)
  tensors = {f'action_head.model.{k}': v for k, v in {**refs.dit_official, **actions}.items()}
  tensors.update({f'action_head.vae.model.{k}': v for k, v in _numpy(refs.vae_official).items()})
  tensors.update({f'action_head.text_encoder.{k}': v for k, v in _numpy(refs.t5).items()})
  tensors.update({f'action_head.image_encoder.model.{k}': v for k, v in refs.clip_wan_names.items()
                  if k.startswith('visual.')})
  source = os.path.join(refs.dir, 'dreamzero', 'model.safetensors')
  os.makedirs(os.path.dirname(source))
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, source)
  out = os.path.join(refs.dir, 'converted_dreamzero')
  convert.convert(refs.cfg, [source], out, embodiment_id=1)
  got_dit, got_enc = release.load_converted(out, settings.from_config(refs.cfg))
  want_dit, want_enc = official_params
  want_dit, want_enc = release.flatten(want_dit), release.flatten(want_enc)
  for path, value in release.flatten(got_dit).items():
    if dit_keys.is_dreamzero_key(path):
      module = {'w1': 'W1', 'w2': 'W2', 'w3': 'W3'}.get(path[1], path[1])
      stored = actions[f'{path[0]}.{module}.{"W" if path[2] == "kernel" else "b"}'][0]
      np.testing.assert_array_equal(value[1], stored, err_msg=str(path))
      # Row 0 was not in the checkpoint: it keeps the initialisation a plain Wan conversion gets.
      np.testing.assert_array_equal(value[0], want_dit[path][0], err_msg=str(path))
    else:
      np.testing.assert_array_equal(value, want_dit[path], err_msg=str(path))
  for path, value in release.flatten(got_enc).items():
    np.testing.assert_array_equal(value, want_enc[path], err_msg=str(path))


@TINY_CLIP
def test_missing_and_unexpected_keys_are_refused_naming_them(refs, tmp_path):
  dit = {k: v for k, v in refs.dit_official.items() if k != 'blocks.1.ffn.2.weight'}
  dit['blocks.0.extra.weight'] = np.ones(3, np.float32)
  sources = [_save_pth(tmp_path / 'dit.pth', dit)] + refs.official_sources[1:]
  out = str(tmp_path / 'out')
  with pytest.raises(WeightMismatchError) as err:
    convert.convert(refs.cfg, sources, out)
  assert 'blocks.0.extra.weight (dit.pth)' in str(err.value)
  assert 'dit/blocks/ffn2/kernel (layers [0] of 2)' in str(err.value)
  assert not os.path.exists(out) and not glob.glob(out + '.tmp-*')
  twice = r'tensors given twice \(\d+\): embeddings.class_embedding \(models_clip.pth\)'
  with pytest.raises(WeightMismatchError, match=twice):
    convert.convert(refs.cfg, refs.official_sources + refs.official_sources[-1:], out)
  # A whole component asked for but absent is named as such rather than as every one of its parameters.
  with pytest.raises(WeightMismatchError, match=r'no --src holds the VAE \(vae\)'):
    convert.convert(refs.cfg, [refs.official_sources[0]] + refs.official_sources[2:], out,
                    components=('dit', 'vae', 'text', 'image'))


@TINY_CLIP
def test_a_dit_only_release_converts_alone(refs, tmp_path):
  """`python -m dreamzero_jax.convert` with only an official Wan DiT .pth: no encoder files, encoder
  widths that fit no model (never read), and the reference forward reproduced. A later command that
  needs an encoder says in one line that the conversion has none."""
  from dreamzero_jax.models import encoders
  dit_only = _save_pth(tmp_path / 'wan_dit.pth', refs.dit_official)
  out = str(tmp_path / 'dit_only')
  absurd = ['--config.text_encoder.dim=7', '--config.image_encoder.width=5', '--config.vae.base_dim=3']
  assert convert.main(['--config', os.path.join(ROOT, 'configs/tiny.py'), '--src', dit_only, '--out', out,
                       *absurd]) == 0
  with open(os.path.join(out, release.MANIFEST)) as f:
    assert json.load(f) == {'components': ['dit'], 'embodiment_rows': []}
  cfg = _cfg(*[a[len('--config.'):] for a in absurd])
  dit_params, enc_params = release.load_converted(out, settings.from_config(cfg), parts=('dit',))
  assert enc_params is None
  dit = with_params(nnx.eval_shape(lambda: build_dit(cfg.model, rngs=nnx.Rngs(0))), dit_params)
  _check_dit(refs, dit)
  with pytest.raises(IncompatibleCheckpointError, match=r'converted without the VAE, .* \(vae,text,image\)') as err:
    encoders.build_frozen_encoders(settings.from_config(_cfg(f'init.converted={out}')))
  assert '\n' not in str(err.value)
  # --components picks what to convert out of fuller sources; an unknown name is a one-line error.
  out2 = str(tmp_path / 'vae_only')
  assert convert.main(['--config', os.path.join(ROOT, 'configs/tiny.py'), '--out', out2, '--components', 'vae',
                       *[a for s in refs.official_sources for a in ('--src', s)]]) == 0
  assert release.read_manifest(out2)['components'] == ['vae']
  assert convert.main(['--config', os.path.join(ROOT, 'configs/tiny.py'), '--src', dit_only,
                       '--out', str(tmp_path / 'x'), '--components', 'dit,clip']) == 2


@TINY_CLIP
def test_a_policy_refuses_an_embodiment_row_never_converted(refs, tmp_path):
  """A plain Wan DiT has no action/state modules: serving it would act with random modules, so the
  policy refuses naming the row; a DreamZero checkpoint converted into the row serves."""
  from dreamzero_jax.datasets import normalization
  from dreamzero_jax.serving import loading as policy_lib
  stats = {g: dict(q01=[-1.0] * 4, q99=[1.0] * 4, mean=[0.0] * 4, std=[1.0] * 4) for g in ('state', 'action')}
  stats['settings'] = dict(action_horizon=refs.cfg.video.action_horizon, relative_action_dims=[])
  path = str(tmp_path / 'norm_stats.json')
  normalization.save_stats(stats, path)
  plain = str(tmp_path / 'plain')
  convert.convert(refs.cfg, [_save_pth(tmp_path / 'dit.pth', refs.dit_official)], plain)
  with pytest.raises(ValueError, match=r'embodiment row 1 \(metaworld\) of the action/state modules was '
                                       r'never converted or trained \(real rows: none\)'):
    policy_lib.load_policy(plain, norm_stats_path=path)
  # The row the release's single shared set went into is real; another row still is not.
  source = _save_pth(tmp_path / 'dreamzero_dit.pth', {**refs.dit_official, **_action_modules(refs.cfg.model, 3)})
  row0 = str(tmp_path / 'row0')
  convert.convert(refs.cfg, [source], row0, embodiment_id=0, components=('dit',))
  assert release.read_manifest(row0)['embodiment_rows'] == [0]
  with pytest.raises(ValueError, match=r'embodiment row 1 \(metaworld\).*\(real rows: \[0\]\)'):
    policy_lib.load_policy(row0, norm_stats_path=path)
  # By default convert writes the config's own embodiment's row, the one its policy reads.
  own = str(tmp_path / 'own')
  encoders_only = [f for f in refs.official_sources[1:] if not f.endswith('action_modules.pth')]
  convert.convert(refs.cfg, [source] + encoders_only, own)
  assert release.read_manifest(own)['embodiment_rows'] == [1]
  assert policy_lib.load_policy(own, norm_stats_path=path).embodiment.id == 1


@TINY_CLIP
def test_checkpoint_of_another_config_is_refused_and_leaves_nothing(refs, official, tmp_path):
  out = str(tmp_path / 'out')
  with pytest.raises(WeightMismatchError, match=r'blocks\.0\.ffn\.0\.weight \(dit\.pth\): checkpoint'):
    convert.convert(_cfg('model.ffn_dim=48'), refs.official_sources, out)
  assert not os.path.exists(out) and not glob.glob(out + '.tmp-*')
  with pytest.raises(IncompatibleCheckpointError, match='model.ffn_dim: 64 \\(checkpoint\\) vs 48'):
    release.load_converted(official, settings.from_config(_cfg('model.ffn_dim=48')))
  release.load_converted(official, settings.from_config(_cfg('model.attention="cudnn"', 'model.scan_layers=False')))


@TINY_CLIP
def test_cli_reports_one_line_errors(refs, tmp_path):
  bad = _save_pth(tmp_path / 'dit.pth', {**refs.dit_official, 'blocks.0.extra.weight': np.ones(2, np.float32)})
  out = str(tmp_path / 'out')
  res = subprocess.run([sys.executable, '-m', 'dreamzero_jax.convert', '--config', 'configs/tiny.py', '--src', bad,
                        *[a for s in refs.official_sources[1:] for a in ('--src', s)], '--out', out],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert res.returncode == 2
  assert res.stderr.strip().count('\n') == 0
  assert res.stderr.startswith('error: unexpected keys (1): blocks.0.extra.weight (dit.pth)')
  assert not os.path.exists(out)


def test_torch_reader_matches_torch_load(tmp_path):
  """bf16 / fp16 / int storages, views sharing a storage, non-contiguous strides, nested dicts."""
  base = torch.randn(4, 5, 6)
  tensors = {'bf16': torch.randn(3, 4).to(torch.bfloat16), 'half': torch.randn(5).half(),
             'long': torch.arange(10)[3:], 'transposed': torch.randn(3, 2).t(),
             'strided': base.permute(2, 0, 1)[1:, :, 2:], 'row': base[2],
             'param': torch.nn.Parameter(torch.randn(2, 2)), 'empty': torch.zeros(0, 3)}
  torch.save({'state_dict': tensors, 'step': 3}, tmp_path / 'x.pth')
  got = dict(torch_files.iter_tensors(str(tmp_path / 'x.pth')))
  want = torch.load(tmp_path / 'x.pth', weights_only=True)['state_dict']
  assert sorted(got) == sorted(f'state_dict.{k}' for k in want)
  for key, value in want.items():
    array = got[f'state_dict.{key}']
    assert array.shape == tuple(value.shape) and array.flags.c_contiguous, key
    np.testing.assert_array_equal(array.astype(np.float64), value.detach().double().numpy(), err_msg=key)


def test_torch_reader_refuses_code_and_safetensors_reads_bf16(tmp_path):
  import collections
  torch.save({'w': torch.ones(2), 'counter': collections.Counter()}, tmp_path / 'evil.pth')
  with pytest.raises(torch_files.CheckpointFormatError, match='refusing to load collections.Counter'):
    torch_files.tensor_refs(str(tmp_path / 'evil.pth'))
  from safetensors.torch import save_file as save_torch
  w = torch.randn(3, 7).to(torch.bfloat16)
  save_torch({'w': w, 'i': torch.arange(4, dtype=torch.int32)}, str(tmp_path / 'x.safetensors'))
  refs = torch_files.tensor_refs(str(tmp_path / 'x.safetensors'))
  assert refs['w'].shape == (3, 7) and refs['w'].dtype == np.dtype('bfloat16')
  np.testing.assert_array_equal(refs['w'].read().astype(np.float32), w.float().numpy())
  np.testing.assert_array_equal(refs['i'].read(), np.arange(4))
  with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
    torch_files.tensor_refs(str(tmp_path / 'absent.pth'))


def test_param_store_writes_rows_and_bands_restorable_by_orbax(tmp_path, monkeypatch):
  """Small chunks force banded writes (with a short last band) of whole arrays and of single rows."""
  import orbax.checkpoint as ocp
  monkeypatch.setattr(convert, 'CHUNK_BYTES', 40)
  rng = np.random.default_rng(0)
  want = {'stacked': rng.standard_normal((3, 5, 4)).astype(np.float32),
          'table': rng.standard_normal((7, 3)).astype(np.float32), 'vector': np.arange(5, dtype=np.float32)}
  leaves = {('a', k): convert.Slot(v.shape, np.dtype(np.float32)) for k, v in want.items()}
  store = convert.ParamStore(str(tmp_path / 'params'), leaves, by_row={('a', 'stacked')})
  with open(tmp_path / 'params' / 'a.stacked' / '.zarray') as f:
    assert json.load(f)['chunks'] == [1, 2, 4]   # one layer, 2 rows of 16 bytes under 40
  for layer in (2, 0, 1):
    store.write(('a', 'stacked'), layer, want['stacked'][layer].astype(np.float16).astype(np.float64))
  store.write(('a', 'table'), None, want['table'])
  store.write(('a', 'vector'), None, want['vector'])
  target = {'a': {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in want.items()}}
  restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
      str(tmp_path / 'params'), args=ocp.args.PyTreeRestore(
          item=target, restore_args={'a': {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in want}}))
  np.testing.assert_array_equal(restored['a']['stacked'], want['stacked'].astype(np.float16).astype(np.float32))
  assert restored['a']['stacked'].dtype == np.float32
  np.testing.assert_array_equal(restored['a']['table'], want['table'])
  np.testing.assert_array_equal(restored['a']['vector'], want['vector'])


def test_formats_are_told_apart_by_their_keys():
  cfg = _cfg()
  fmts = convert.formats(settings.from_config(cfg), 0)

  def detect(*keys):
    fmt = next(f for f in fmts if any(re.match(f.signature, k) for k in keys))
    return fmt.component, fmt.name

  assert detect('patch_embedding.weight', 'blocks.0.self_attn.q.weight') == ('dit', 'wan')
  assert detect('patch_embedding.weight', 'blocks.0.attn1.to_q.weight') == ('dit', 'diffusers')
  assert detect('action_encoder.W1.W') == ('dit', 'wan')
  assert detect('conv1.weight', 'encoder.downsamples.0.residual.0.gamma') == ('vae', 'wan')
  assert detect('encoder.conv_in.weight', 'encoder.down_blocks.0.norm1.gamma') == ('vae', 'diffusers')
  assert detect('token_embedding.weight', 'blocks.0.attn.q.weight') == ('text', 'wan')
  assert detect('shared.weight', 'encoder.block.0.layer.0.SelfAttention.q.weight') == ('text', 'transformers')
  assert detect('log_scale', 'visual.transformer.0.attn.to_qkv.weight') == ('image', 'wan')
  # open_clip's text tower has a token_embedding too: the vision tower decides.
  assert detect('token_embedding.weight', 'visual.transformer.resblocks.0.ln_1.weight') == ('image', 'open_clip')
  assert detect('vision_model.embeddings.patch_embedding.weight') == ('image', 'transformers')


@pytest.mark.slow
def test_conversion_memory_is_bounded_by_the_largest_tensor(tmp_path):
  """A >= 2 GB DiT checkpoint converts with peak RSS < 0.5 GB over the Python baseline."""
  from bench import convert_memory
  try:
    result = convert_memory.measure(str(tmp_path), layers=62)
  finally:
    shutil.rmtree(tmp_path)   # 4 GB of checkpoints: do not leave them to pytest's retention
  assert result['checkpoint_bytes'] >= 2e9
  assert result['peak_over_baseline_bytes'] < 0.5e9, result


@TINY_CLIP
def test_nonfinite_weights_are_refused_naming_the_tensor_unless_allowed(refs, tmp_path):
  dit = dict(refs.dit_official)
  dit['blocks.1.ffn.2.weight'] = dit['blocks.1.ffn.2.weight'].copy()
  dit['blocks.1.ffn.2.weight'][0, 0] = np.nan
  sources = [_save_pth(tmp_path / 'dit.pth', dit)] + refs.official_sources[1:]
  out = str(tmp_path / 'out')
  with pytest.raises(ValueError) as err:   # convert.NonFiniteWeightError
    convert.convert(refs.cfg, sources, out)
  message = str(err.value)
  assert '\n' not in message and message.startswith('blocks.1.ffn.2.weight (dit.pth): 1 NaN/inf values')
  assert '--allow_nonfinite' in message and not os.path.exists(out) and not glob.glob(out + '.tmp-*')
  # float32 values beyond float16's range are inf after the cast: refused as well.
  big = {k: np.full_like(v, 1e6) if k == 'text_embedding.0.weight' else v for k, v in dit.items()
         if k != 'blocks.1.ffn.2.weight'}
  big['blocks.1.ffn.2.weight'] = refs.dit_official['blocks.1.ffn.2.weight']
  with pytest.raises(ValueError, match=r'^text_embedding\.0\.weight \(big\.pth\): .* float16'):
    convert.convert(_cfg('model.param_dtype="float16"'), [_save_pth(tmp_path / 'big.pth', big)]
                    + refs.official_sources[1:], out)
  convert.convert(refs.cfg, sources, out, allow_nonfinite=True)
  assert os.path.isdir(out)
