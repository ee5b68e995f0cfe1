"""The release's per-embodiment facts: prompt templates, the AgiBot configuration and the statistics
file format. Expected values are written out here from the release (dreamzero0/dreamzero at ab790c1),
not computed by our code."""
import json
import os

import numpy as np
import pytest

from dreamzero_jax import config as config_lib
from dreamzero_jax import embodiments, settings
from dreamzero_jax.datasets import episodes, normalization

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTION = 'Pick up the Red Cup.'

# groot/vla/model/dreamzero/transform/dreamzero_cotrain.py, collate(), for INSTRUCTION.
OFFICIAL_DROID = (
    "A multi-view video shows that a robot pick up the red cup. The video is split into three views: "
    "The top view shows the camera view from the robot's wrist, the bottom-left view shows the camera "
    "view from the left exterior camera, and the bottom-right view shows the camera view from the right "
    "exterior camera. During training, one of the two bottom exterior views may be a black screen "
    "(dropped view). The robot pick up the red cup.")
OFFICIAL_AGIBOT = (
    "A multi-view video shows that a robot pick up the red cup. The video is split into four views: "
    "The top-left view shows the camera view from the robot's head, the top-right view shows the camera "
    "view from the right hand, the bottom-left view shows the camera view from the left hand, and the "
    "bottom-right view is a black screen (inactive view). The robot pick up the red cup.")
OFFICIAL_HUMAN = 'A single view video shows that a human pick up the red cup.'
# dreamzero_cotrain.py, text_negative.
OFFICIAL_NEGATIVE = (
    'Vibrant colors, overexposed, static, blurry details, text, subtitles, style, artwork, painting, '
    'image, still, grayscale, dull, worst quality, low quality, JPEG artifacts, ugly, mutilated, extra '
    'fingers, bad hands, bad face, deformed, disfigured, mutated limbs, fused fingers, stagnant image, '
    'cluttered background, three legs, many people in the background, walking backwards.')


def _config(name, *overrides):
  return config_lib.load_config(os.path.join(REPO, 'configs', name), list(overrides))


def test_templates_give_the_official_prompts():
  prompt = lambda name: embodiments.prompt(INSTRUCTION, embodiments.template(name))
  assert prompt('droid') == OFFICIAL_DROID
  assert prompt('agibot') == OFFICIAL_AGIBOT
  assert prompt('xdof') == OFFICIAL_AGIBOT
  assert prompt('human') == OFFICIAL_HUMAN
  cfg = _config('dreamzero_14b_droid.py')
  assert embodiments.prompt_templates(cfg.data)[0] == embodiments.template('droid')
  assert cfg.sampler.negative_prompt == OFFICIAL_NEGATIVE
  assert _config('dreamzero_14b_agibot.py').sampler.negative_prompt == OFFICIAL_NEGATIVE
  # A config may override its own embodiment's template, by name or as text.
  cfg = _config('dreamzero_14b_droid.py', 'data.prompt_template=plain')
  assert embodiments.prompt(INSTRUCTION, embodiments.prompt_templates(cfg.data)[0]) == INSTRUCTION
  with pytest.raises(ValueError, match='data.prompt_template'):
    embodiments.template('no placeholder here')


def test_prompts_reach_the_text_encoder_templated():
  """PromptEncoder.text, the one way to the text encoder (training batches and the policy both call
  it): an instruction is encoded in its embodiment's template, the negative prompt as given."""
  from flax import nnx
  from dreamzero_jax.models import encoders
  cfg = settings.from_config(_config('tiny.py', 'text_encoder.tokenizer=', 'model.text_len=512'))
  enc = encoders.BatchEncoder(encoders.FrozenEncoders(cfg, rngs=nnx.Rngs(0)), cfg).prompts
  metaworld = embodiments.get('metaworld').id
  got = np.asarray(enc.text([INSTRUCTION.encode()], [metaworld], negative_prompt='bad'))
  templated = embodiments.prompt(INSTRUCTION, embodiments.template('metaworld'))
  raw = np.asarray(enc.prompts([templated, 'bad']))
  np.testing.assert_array_equal(got, raw)
  assert not np.array_equal(got[0], np.asarray(enc.prompts([INSTRUCTION]))[0])


def test_agibot_config_is_the_release():
  cfg = _config('dreamzero_14b_agibot.py')
  # agibot_training.sh / agibot_relative.yaml / convert_agibot.py:
  assert cfg.video.action_horizon == 24            # action_horizon=24, num_action_per_block=24
  assert cfg.data.frame_stride == 3                # frames at anchor + [0, 3, ..., 21]
  assert cfg.video.frames_per_chunk == 8
  assert cfg.data.control_hz == 30
  assert cfg.data.state_dim == 20                  # arms 7+7, effectors 1+1, head 2, waist 2
  assert cfg.data.action_dim == 22                 # the same 20 + robot_velocity 2
  # Relative keys: both arms, both effectors, head and waist = action dims 0..19; velocity absolute.
  assert tuple(cfg.data.relative_action_dims) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                                  16, 17, 18, 19)
  assert cfg.data.cameras == ('top_head', 'hand_left', 'hand_right')
  e = embodiments.get('agibot')
  assert (e.state_dim, e.action_dim, e.frame_stride) == (20, 22, 3)
  assert e.relative_action_dims == tuple(cfg.data.relative_action_dims)
  assert e.id < cfg.model.num_embodiments


def test_official_preprocessing_defaults():
  cfg = _config('dreamzero_14b_droid.py')
  d = cfg.data
  assert (d.augment_crop_scale, d.augment_brightness, d.augment_contrast, d.augment_saturation,
          d.augment_hue) == (0.95, 0.3, 0.4, 0.5, 0.08)


def _gear_meta(root, relative_keys=('joint_position',)):
  """A LeRobot GEAR meta/ folder as the release's DROID conversion writes it: state cartesian(6),
  gripper(1), joint(7); the action's joint_position relative in relative_stats_dreamzero.json."""
  meta = os.path.join(root, 'meta')
  os.makedirs(meta)
  modality = {'state': {'cartesian_position': {'original_key': 'observation.state', 'start': 0, 'end': 6},
                        'gripper_position': {'original_key': 'observation.state', 'start': 6, 'end': 7},
                        'joint_position': {'original_key': 'observation.state', 'start': 7, 'end': 14}},
              'action': {'gripper_position': {'original_key': 'action', 'start': 0, 'end': 1},
                         'joint_position': {'original_key': 'action', 'start': 1, 'end': 8}}}
  col = lambda n, base: {s: [base + 10 * i + k for i in range(n)]
                         for k, s in enumerate(('min', 'max', 'mean', 'std', 'q01', 'q99'))}
  stats = {'observation.state': col(14, 100.0), 'action': col(8, 200.0)}
  relative = {k: {s: [0.5 + i for i in range(7)] if s != 'q01' else [-0.5 - i for i in range(7)]
                  for s in ('min', 'max', 'mean', 'std', 'q01', 'q99')} for k in relative_keys}
  for name, value in (('modality.json', modality), ('stats.json', stats),
                      ('relative_stats_dreamzero.json', relative)):
    with open(os.path.join(meta, name), 'w') as f:
      json.dump(value, f)
  return os.path.join(meta, 'relative_stats_dreamzero.json')


def test_official_statistics_are_read_as_they_are(tmp_path):
  path = _gear_meta(str(tmp_path))
  e = embodiments.get('droid')
  stats = normalization.from_official(path, e, 24, range(7))
  # State: joint_position (columns 7..13) then gripper_position (column 6), as the model reads them.
  assert stats['state']['q01'] == [100.0 + 10 * i + 4 for i in range(7, 14)] + [100.0 + 60 + 4]
  # Action: relative joint statistics from the relative file, the gripper from stats.json column 0.
  assert stats['action']['q01'] == [-0.5 - i for i in range(7)] + [204.0]
  assert stats['action']['q99'] == [0.5 + i for i in range(7)] + [205.0]
  normalization.check_stats(stats, 8, 8, 24, range(7), path)
  # A release whose relative keys differ from the config's relative dims is refused, naming both.
  other = _gear_meta(str(tmp_path / 'b'), relative_keys=())
  with pytest.raises(episodes.DataError, match=r'relative keys \[\] are action dims \[\]'):
    normalization.from_official(other, e, 24, range(7))
  # A checkpoint's experiment_cfg/metadata.json (statistics merged per key).
  meta = {'oxe_droid': {'statistics': {
      'state': {'joint_position': {s: [1.0] * 7 for s in ('q01', 'q99', 'mean', 'std')},
                'gripper_position': {s: [2.0] for s in ('q01', 'q99', 'mean', 'std')}},
      'action': {'joint_position': {s: [3.0] * 7 for s in ('q01', 'q99', 'mean', 'std')},
                 'gripper_position': {s: [4.0] for s in ('q01', 'q99', 'mean', 'std')}}}}}
  with open(tmp_path / 'metadata.json', 'w') as f:
    json.dump(meta, f)
  stats = normalization.read_stats(str(tmp_path / 'metadata.json'), e, 24, range(7))
  assert stats['state']['q99'] == [1.0] * 7 + [2.0] and stats['action']['q01'] == [3.0] * 7 + [4.0]


def test_stats_cli_imports_the_official_file(tmp_path):
  import subprocess
  import sys
  path = _gear_meta(str(tmp_path))
  out = str(tmp_path / 'norm_stats.json')
  r = subprocess.run([sys.executable, '-m', 'dreamzero_jax.datasets', 'stats', '--config',
                      'configs/dreamzero_14b_droid.py', '--from_official', path, '--out', out],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  with open(out) as f:
    stats = json.load(f)
  assert stats['action']['q99'][:7] == [0.5 + i for i in range(7)]
  assert stats['settings'] == {'action_horizon': 24, 'relative_action_dims': list(range(7))}
