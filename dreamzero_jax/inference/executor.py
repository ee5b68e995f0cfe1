"""Asynchronous chunk execution (paper): compute chunk k+1 while chunk k runs on the robot.

Chunk k's actions are sent one per control tick. Chunk k+1 is computed in a worker thread
started when chunk k starts executing (so it sees the newest observation). Its deadline is the
END of chunk k, not the next control tick: a miss means the robot would have had nothing to
execute. A late chunk starts as soon as it is ready; the miss and its lateness are recorded.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class ChunkRecord:
  """Timing of one chunk, in seconds since `run` started."""
  index: int
  compute_start: float
  compute_end: float
  deadline: float | None  # end of the chunk executing meanwhile; None for the first chunk
  exec_start: float

  @property
  def missed(self) -> bool:
    return self.deadline is not None and self.compute_end > self.deadline

  @property
  def lateness(self) -> float:
    return max(0.0, self.compute_end - self.deadline) if self.deadline is not None else 0.0


@dataclasses.dataclass(frozen=True)
class ExecutionReport:
  chunks: list[ChunkRecord]
  actions_executed: int
  stopped_early: bool

  @property
  def deadline_misses(self) -> int:
    return sum(c.missed for c in self.chunks)

  @property
  def max_lateness(self) -> float:
    return max((c.lateness for c in self.chunks), default=0.0)


class AsyncChunkExecutor:
  """Overlaps policy inference with execution at a fixed control rate.

  compute_chunk(k) -> [horizon, action_dim] actions of chunk k (called in a worker thread for
  k >= 1; it should read the newest observation itself). execute_action(action) sends one
  action to the robot and returns True to end the episode (the in-flight chunk is discarded).
  """

  def __init__(self, compute_chunk: Callable[[int], np.ndarray],
               execute_action: Callable[[np.ndarray], bool | None], control_hz: float):
    if control_hz <= 0:
      raise ValueError(f'control_hz must be positive, got {control_hz}')
    self._compute_chunk = compute_chunk
    self._execute_action = execute_action
    self._period = 1.0 / control_hz

  def run(self, num_chunks: int) -> ExecutionReport:
    """Computes and executes `num_chunks` chunks; returns their timing."""
    t0 = time.perf_counter()

    def now():
      return time.perf_counter() - t0

    def timed_compute(index):
      start = now()
      actions = np.asarray(self._compute_chunk(index))
      return actions, start, now()

    records, executed = [], 0
    actions, compute_start, compute_end = timed_compute(0)
    deadline, exec_start = None, compute_end
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      for k in range(num_chunks):
        records.append(ChunkRecord(k, compute_start, compute_end, deadline, exec_start))
        pending = pool.submit(timed_compute, k + 1) if k + 1 < num_chunks else None
        deadline = exec_start + len(actions) * self._period
        for i, action in enumerate(actions):
          _sleep_until(now, exec_start + i * self._period)
          executed += 1
          if self._execute_action(action):
            if pending is not None:
              pending.result()  # let the worker finish; its chunk is never executed
            return ExecutionReport(records, executed, stopped_early=True)
        _sleep_until(now, deadline)  # the last action holds for one full period
        if pending is not None:
          actions, compute_start, compute_end = pending.result()
          exec_start = max(deadline, compute_end)
    return ExecutionReport(records, executed, stopped_early=False)


def _sleep_until(now: Callable[[], float], target: float) -> None:
  remaining = target - now()
  if remaining > 0:
    time.sleep(remaining)
