import os
import subprocess
import sys

import jax
import pytest

from dn2_jax.compile_cache import MAX_CACHE_BYTES, host_key, use_compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process compiles a small program with the cache on and counts the cache hits JAX reports.
_SCRIPT = """
import sys
import jax, jax.numpy as jnp
from dn2_jax.compile_cache import use_compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e.endswith("cache_hits") else None)
folder = use_compilation_cache(sys.argv[1])
y = jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8)))
print(folder, len(hits), float(y[0, 0]))
"""


def _run(cache_dir, env=None):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(cache_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder, hits, value = proc.stdout.split()
    return folder, int(hits), value


@pytest.mark.slow  # two processes importing JAX: ~7 s on a quiet machine
def test_second_process_loads_compiled_program_from_host_keyed_folder(tmp_path):
    env = {"JAX_COMPILATION_CACHE_DIR": ""}
    folder, hits, value = _run(tmp_path, env)
    assert folder == str(tmp_path / "xla" / host_key()) and hits == 0
    assert any(name.startswith("jit_") for name in os.listdir(folder))  # written although it compiled fast
    folder2, hits2, value2 = _run(tmp_path, env)
    assert (folder2, value2) == (folder, value) and hits2 >= 1


_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")


def test_environment_folder_wins_and_thresholds_are_lowered(tmp_path, monkeypatch):
    before = {name: getattr(jax.config, name) for name in _SETTINGS}
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    try:
        assert use_compilation_cache(tmp_path / "dn2") == tmp_path / "mine"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        assert jax.config.jax_compilation_cache_max_size == MAX_CACHE_BYTES
    finally:  # a process-wide setting: leave the test process as it was
        for name, value in before.items():
            jax.config.update(name, value)


def test_host_key_is_stable_hex():
    assert host_key() == host_key() and len(host_key()) == 16 and int(host_key(), 16) >= 0
