"""Multi-controller JAX: one process per host (or per GPU), all running the same program.

`initialize` starts `jax.distributed` before anything touches a device:
  * explicitly with --coordinator_address/--num_processes/--process_id (any machine; the tests
    run two processes on 127.0.0.1 this way, launch/local.sh too);
  * automatically where JAX can read the cluster from the environment: a multi-host TPU slice
    (TPU VM or GKE) and SLURM jobs of more than one task;
  * not at all otherwise: a single process, as on a laptop.
A dead peer must not leave the others hanging in a collective: the coordination service's
heartbeat timeout bounds how long the survivors wait before they stop with an error.
"""
import os
import time

import jax
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils


def cluster() -> str | None:
  """The multi-process environment JAX can configure itself from, if any."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return "slurm"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu"
  return None


def initialize(coordinator_address=None, num_processes=None, process_id=None, *,
               heartbeat_timeout: int = 60, init_timeout: int = 300) -> bool:
  """Start jax.distributed if this is one of several processes; True if it was started."""
  given = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together; give "
                     "all three (or none on a TPU slice or under SLURM)")
  if all(given):
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
    if num_processes == 1:
      return False
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  elif cluster():
    kwargs = {}
  else:
    return False
  # CPU arrays of different processes meet through gloo (the default CPU client has no
  # cross-process collectives); accelerator collectives are unaffected.
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs, initialization_timeout=init_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout)
  return True


def say(*args):
  """print, from process 0 only (every process runs the same program)."""
  if jax.process_index() == 0:
    print(*args, flush=True)


def barrier(name: str):
  """Wait until every process gets here (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def leave_together(timeout_s: float = 60.0):
  """Call before exiting on an error that every process may meet (a bad config, a NaN streak).

  When process 0 exits, the coordination service it hosts goes with it, and JAX aborts the
  other processes with a fatal log line, possibly before they print their own error. So each
  process marks that it is leaving (in the service's key-value store) and process 0 waits, at
  most `timeout_s`, until all others have, then leaves itself. An error met by process 0 alone
  costs at most that wait. (The store is reached through jax._src: jax has no public handle.)"""
  client = jax_distributed.global_state.client
  if client is None or jax.process_count() == 1:
    return
  client.key_value_set(f"anchoredit/leaving/{jax.process_index()}", "1")
  if jax.process_index() != 0:
    return
  deadline = time.monotonic() + timeout_s
  for i in range(1, jax.process_count()):
    left_ms = int((deadline - time.monotonic()) * 1000)
    try:
      client.blocking_key_value_get(f"anchoredit/leaving/{i}", max(left_ms, 1))
    except Exception:  # timed out, or the service is already failing: leave now
      return
