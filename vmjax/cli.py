"""What the command-line tools share: a bad input is one line on stderr and exit code 1, and
``--help`` works for installed commands as for ``python -m experiments.X``."""

from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax

from vmjax import host_memory
from vmjax import registration

flags.DEFINE_bool("library_logs", False, "Also show other libraries' INFO logs (orbax, jax); "
                  "by default the log is vmjax's own progress plus everyone's warnings.")

_PACKAGE = os.path.dirname(os.path.abspath(__file__))

# What bad input raises: DataError (a ValueError) for scans and settings, FileNotFoundError for
# missing models or workdirs, OSError for unreadable or unwritable paths.
INPUT_ERRORS = (ValueError, FileNotFoundError, OSError)


def define_instance_flags(module_name: str, default_steps: int, default_tol: float) -> None:
  """``--instance_steps``, ``--instance_lr``, ``--instance_lam``, ``--instance_target``,
  ``--instance_tol`` for a command (listed in the ``--help`` of ``module_name``); read them back
  with :func:`instance_from_flags`."""
  flags.DEFINE_integer("instance_steps", default_steps,
                       "Instance optimisation: steps on this pair's training loss after the "
                       "network (NAdam on its field, Adam on its parameters; 0: none).",
                       lower_bound=0, module_name=module_name)
  flags.DEFINE_float("instance_lr", None, "Its learning rate (default: registration.INSTANCE_LR: "
                     f"{registration.INSTANCE_LR}).", module_name=module_name)
  flags.DEFINE_float("instance_lam", None, "Its smoothness weight (default: "
                     f"registration.INSTANCE_LAM: {registration.INSTANCE_LAM}; None: the "
                     "training's).", module_name=module_name)
  flags.DEFINE_enum("instance_target", "field", list(registration.INSTANCE_LR),
                    "What it tunes: the network's field for this pair (fast: no network pass "
                    "per step) or the network's parameters (VoxelMorph's instance-specific "
                    "optimisation).", module_name=module_name)
  flags.DEFINE_float("instance_tol", default_tol, "Stop the field's refinement before "
                     "--instance_steps once converged: when its last "
                     f"{registration.CONVERGENCE_WINDOW} steps lowered the loss by less than "
                     "this fraction of its decrease so far (0: every step).", lower_bound=0.0,
                     upper_bound=0.99, module_name=module_name)


def instance_from_flags(steps: int | None = None) -> registration.InstanceOptimisation:
  """The :class:`vmjax.registration.InstanceOptimisation` the flags ask for (``steps``
  overrides ``--instance_steps``)."""
  f = flags.FLAGS
  return registration.InstanceOptimisation(
      f.instance_steps if steps is None else steps, f.instance_lr, f.instance_lam,
      f.instance_target, tol=f.instance_tol)


def define_distributed_flags(module_name: str) -> None:
  """``--coordinator_address``, ``--num_processes``, ``--process_id``: a multi-process run
  launched by hand (training, cohort registration); check and apply them with
  :func:`initialize_distributed`."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs "
                      "launched by hand; see the module docstring).", module_name=module_name)
  flags.DEFINE_integer("num_processes", 1, "Number of processes (with --coordinator_address).",
                       module_name=module_name)
  flags.DEFINE_integer("process_id", 0, "This process's index (with --coordinator_address).",
                       module_name=module_name)


def initialize_distributed(cluster_hint: str) -> None:
  """Starts JAX's multi-process runtime when the distributed flags ask for it; inconsistent
  flags are a usage error (``cluster_hint``: how this command reads a cluster's own settings)."""
  f = flags.FLAGS
  if not f.coordinator_address and (f.num_processes != 1 or f.process_id != 0):
    raise app.UsageError("--num_processes / --process_id need --coordinator_address (host:port "
                         f"of process 0); {cluster_hint}")
  if f.coordinator_address and not 0 <= f.process_id < f.num_processes:
    raise app.UsageError(f"--process_id={f.process_id} is not in [0, --num_processes="
                         f"{f.num_processes})")
  if f.coordinator_address:
    jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)


def run_reporting_errors(command: str, run: Callable[[], None],
                         errors: tuple[type[BaseException], ...] = INPUT_ERRORS) -> None:
  """Calls ``run()``; one of ``errors`` ends the process with ``command: error: message``."""
  try:
    run()
  except errors as e:
    print(f"{command}: error: {one_line(e)}", file=sys.stderr)
    sys.exit(1)


def one_line(error: BaseException) -> str:
  """An exception's text on one line, whatever its own line breaks; prefixed by its type unless
  it is one of :data:`INPUT_ERRORS` (whose messages name the file or setting themselves)."""
  text = " ".join(str(error).split())
  return text if isinstance(error, INPUT_ERRORS) else f"{type(error).__name__}: {text}"


def run_main(main: Callable, module_name: str, doc: str | None,
             exit_at_once: bool = False) -> None:
  """``absl.app.run(main)`` for a module that may be an installed command's target rather than
  ``__main__``: ``--help`` then still shows the module's docstring and flags.

  ``exit_at_once``: when ``main`` succeeds in a single-process run, the process ends there
  (:func:`exit_now`) instead of tearing the interpreter down — for a command whose outputs are
  all written and closed when ``main`` returns (``vmjax-register``)."""
  own = (_PACKAGE, os.path.dirname(os.path.abspath(sys.modules[module_name].__file__)))

  def quiet_libraries(argv):
    host_memory.keep_freed_memory()
    if not flags.FLAGS.library_logs:
      logging.get_absl_handler().addFilter(_OwnInfoOnly(own))
    result = main(argv)
    if exit_at_once and not result and jax.process_count() == 1:
      exit_now()
    return result

  main_module = sys.modules["__main__"]
  if not main_module.__doc__:
    main_module.__doc__ = doc
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(quiet_libraries)


def exit_now(code: int = 0) -> None:
  """Flushes the logs and the standard streams and ends the process with ``code``, skipping the
  interpreter's teardown: freeing XLA's buffers and backends and every module's objects took
  0.3-0.5 s after ``vmjax-register``'s last output was written (the process's wall time minus
  the log's "done in", 2-core AMD EPYC Zen 4, 2026-12-06). Only for the end of a command: no
  ``atexit`` handler or ``finally`` block runs."""
  std_logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


class _OwnInfoOnly(std_logging.Filter):
  """Passes warnings and errors from anyone, INFO only from files under ``prefixes``."""

  def __init__(self, prefixes):
    super().__init__()
    self.prefixes = tuple(prefixes)

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING
            or os.path.abspath(record.pathname).startswith(self.prefixes))
