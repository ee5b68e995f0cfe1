"""DROID (RLDS release, e.g. droid_100 or the full 1.7 TB) into stacked episodes.

State = joint_position (7) + gripper_position (1); action = the commanded absolute
action_dict joint_position (7) + gripper_position (1): the pipeline makes the joints relative
to each chunk's anchor state. Three phrasings of the instruction per step. An episode succeeded when
its recording folder lies under success/ (DROID files failures under failure/).
`--src`: the version folder (droid/1.0.1) or the TFDS data_dir holding droid/ or droid_100/.
"""
from __future__ import annotations

from data.rlds import rlds_dataset_builder
from dreamzero_jax.datasets import rlds_reader

SPEC = {
    'name': 'droid',
    'embodiment': 'droid',
    'cameras': {
        'wrist_image_left': 'steps/observation/wrist_image_left',
        'exterior_image_1_left': 'steps/observation/exterior_image_1_left',
        'exterior_image_2_left': 'steps/observation/exterior_image_2_left',
    },
    'state': ['steps/observation/joint_position', 'steps/observation/gripper_position'],
    'action': ['steps/action_dict/joint_position', 'steps/action_dict/gripper_position'],
    'language': ['steps/language_instruction', 'steps/language_instruction_2',
                 'steps/language_instruction_3'],
    'episode_id': 'episode_metadata/file_path',
    'success': {'path': 'episode_metadata/recording_folderpath', 'contains': '/success/'},
}


class Droid(rlds_dataset_builder.Rlds):
  name = 'droid'

  def __init__(self, *, src: str, on_corrupt: str = 'fail', **kwargs):
    src = rlds_reader.resolve_src(src, ('droid', 'droid_100'))
    super().__init__(src=src, spec=SPEC, on_corrupt=on_corrupt, **kwargs)
