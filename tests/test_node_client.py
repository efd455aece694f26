"""The Node.js client (realtime/clients/node, written from docs/PROTOCOL.md) against a live runtime."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "realtime" / "clients" / "node"


@pytest.fixture(scope="session")
def node_client(tmp_path_factory):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    work = tmp_path_factory.mktemp("node") / "client"
    shutil.copytree(NODE_DIR, work, ignore=shutil.ignore_patterns("node_modules"))
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=work,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"npm install failed (the npm registry must be reachable): {done.stderr[-2000:]}")
    return work


def test_node_client_streams_frames_and_pose_and_gets_contiguous_audio(node_client, live):
    endpoints, _ = live
    args = json.dumps({k: getattr(endpoints, k) for k in ("frames", "pose", "control", "audio")})
    done = subprocess.run(["node", "smoke.mjs", args, "1.2"], cwd=node_client, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["frames_received"] == 30 and summary["rejected"] == 0
    assert summary["messages"] >= 13 and summary["samples"] == 1280 * summary["messages"]
    assert summary["contiguous"] and summary["finite"]
    assert int(summary["first_t_ns"]) == 2_000_000_000_000 - 20_000_000  # media time of sample 0: -20 ms
