"""The same heal run on 1 device, 8 forced CPU devices (mesh 2x2x2) and 2 processes on
127.0.0.1; SIGKILL mid-run and resume; a corrupted latest checkpoint; a different recipe."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

RUN = os.path.join(os.path.dirname(__file__), "heal_run.py")
STEPS = "8"


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["OPENBLAS_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run(out, *args, devices=1, check=True, **env):
    proc = subprocess.run([sys.executable, RUN, str(out), "--steps", STEPS, *args],
                          env=_env(devices, **env), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _params(npz):
    return [npz[k] for k in sorted((k for k in npz.files if k.startswith("p")),
                                   key=lambda k: int(k[1:]))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted run on one device."""
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    _run(out, "--mesh", "1", "1", "1")
    return np.load(out)


def test_eight_devices_match_one(reference, tmp_path):
    out = tmp_path / "mesh.npz"
    _run(out, "--mesh", "2", "2", "2", devices=8)
    mesh = np.load(out)
    assert len(mesh["losses"]) == int(STEPS)
    np.testing.assert_allclose(mesh["losses"], reference["losses"], rtol=1e-5)
    assert reference["losses"][-1] < reference["losses"][0]  # it trains


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(reference, tmp_path):
    out = tmp_path / "mp.npz"
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, RUN, str(out), "--steps", STEPS, "--mesh", "2", "2", "2"],
        env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    np.testing.assert_allclose(np.load(out)["losses"], reference["losses"], rtol=1e-5)


def _latest_step(ckpt) -> int:
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps, default=0)


def test_sigkill_resume_is_bit_exact_and_fallbacks(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "resumed.npz"
    args = ["--mesh", "1", "1", "1", "--ckpt", str(ckpt), "--every", "2"]
    proc = subprocess.Popen([sys.executable, RUN, str(out), "--steps", STEPS, *args,
                             "--step-delay", "1.0"], env=_env(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _latest_step(ckpt) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _latest_step(ckpt)
    assert 4 <= killed_at < int(STEPS)

    _run(out, *args)
    resumed = np.load(out)
    assert int(resumed["resumed"]) == killed_at
    for a, b in zip(_params(resumed), _params(reference), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit
    np.testing.assert_array_equal(resumed["losses"], reference["losses"][killed_at:])

    # A corrupted latest checkpoint: warn, resume from the one before, same result.
    latest = os.path.join(ckpt, STEPS)
    for root, _, files in os.walk(os.path.join(latest, "state")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"corrupted")
    proc = _run(out, *args)
    assert "unreadable" in proc.stderr
    again = np.load(out)
    assert int(again["resumed"]) == int(STEPS) - 2
    for a, b in zip(_params(again), _params(reference), strict=True):
        np.testing.assert_array_equal(a, b)

    # Checkpoints of another run (here: another model) are refused, not silently used.
    proc = _run(out, *args, "--model-seed", "1", check=False)
    assert proc.returncode != 0
    assert "different recipe" in proc.stderr
