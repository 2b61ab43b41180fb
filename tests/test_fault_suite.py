"""The fast part of the fault-injection suite (benchmark/faults.py): a smoke stage-1 run killed
with SIGKILL and with SIGTERM at a random moment after its first checkpoint, then rerun, ends
with the same losses and parameters, bit for bit, as a run never interrupted. The full suite
(10 trials per stage and signal) is `python -m benchmark.faults`; its table is in RESULTS.md."""
import random

import pytest

from benchmark import faults


def test_a_killed_and_a_preempted_run_resume_bit_exact(tmp_path):
  ref = faults.make_reference("pretrain", str(tmp_path))
  assert sorted(ref["losses"]) == list(range(1, faults.STEPS + 1))
  rng = random.Random(0)
  for kind in ("kill", "term"):
    row = faults.trial("pretrain", kind, rng, str(tmp_path / kind), ref)
    assert row["same_losses"] and row["same_params"], row
    if kind == "term" and not row["exit_before_signal"]:
      assert row["lost_steps"] == 0, row  # SIGTERM saves the step it was on
  table = faults.table([row])
  assert "| pretrain | SIGTERM | 1 | 1 |" in table, table


@pytest.mark.faults
def test_every_stage_survives_ten_random_kills_and_preemptions(tmp_path):
  rows = faults.run_suite(["pretrain", "causal", "distill"], ["kill", "term"], 10, root=str(tmp_path))
  print("\n" + faults.table(rows))
  assert all(r["survived"] for r in rows), [r for r in rows if not r["survived"]]
