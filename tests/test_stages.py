"""Stage timing and JAX's persistent compilation cache (vmjax/stages.py)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from vmjax import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stages_charge_time_and_compilation_to_the_innermost_stage(monkeypatch):
  clock = iter([0.0, 1.0, 3.0, 10.0])  # outer starts, inner starts, inner ends, outer ends
  monkeypatch.setattr(stages.time, "perf_counter", lambda: next(clock))
  with stages.recording() as rec:
    with stages.stage("outer"):
      with stages.stage("inner"):
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.arange(7.0))  # a new program: compiled here
  assert list(rec.seconds) == ["inner", "outer"]
  assert rec.seconds["inner"] == pytest.approx(2.0)
  assert rec.seconds["outer"] == pytest.approx(10.0 - 2.0)  # its own time, not inner's again
  assert rec.compiled >= 1 and rec.compile_seconds["inner"] > 0
  assert "outer" not in rec.compile_seconds
  table = rec.table()
  assert "| inner | 2.00 |" in table and "| total | 10.00 |" in table


def test_stage_and_sync_cost_nothing_without_a_recorder():
  x = jnp.ones(3)
  with stages.stage("unrecorded"):
    assert stages.sync(x) is x


_PROGRAM = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from vmjax import stages
    stages.enable_compilation_cache(sys.argv[1])
    with stages.recording() as rec:
      f = jax.jit(lambda x: jnp.sin(x) @ x.T + 2.0)
      f(jnp.ones((5, 5))).block_until_ready()
    print(rec.cache_misses, rec.cache_hits)
""")


@pytest.mark.slow
def test_a_second_process_loads_its_programs_from_the_compilation_cache(tmp_path):
  """Counts compilations, not seconds: the first process compiles and fills the cache, the
  second (same program, same shapes) compiles nothing."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  env.pop("VMJAX_COMPILATION_CACHE", None)

  def run():
    out = subprocess.run([sys.executable, "-c", _PROGRAM, str(tmp_path / "cache")], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return [int(n) for n in out.stdout.split()[-2:]]

  misses, hits = run()
  assert misses >= 1 and hits == 0
  assert os.listdir(tmp_path / "cache")
  misses, hits = run()
  assert misses == 0 and hits >= 1
