"""A full --state-dir disk (issue 16 item 3), on a real filesystem: a small tmpfs mounted by
the test, `serve --state-dir` on it with one real cpu worker on the tiny kit, the disk filled
while a job runs. What clients must see: a new job is refused `unavailable` naming the journal
(never silence); the running job gets its reply, and every resend of it, before and after the
disk is freed and after a restart, gets that same reply (same seed, same bytes), never a
second run. Needs root (mount); skipped with the reason where the mount fails."""

from __future__ import annotations

import errno
import os
import subprocess

import msgpack
import pytest
import zmq

from tests.serve.conftest import one_cpu_worker_argv, wait_for

pytestmark = pytest.mark.slow

DISK_MB = 4


@pytest.fixture
def small_disk(tmp_path):
    """A DISK_MB tmpfs at tmp_path/state, unmounted on teardown."""
    mount_point = tmp_path / "state"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory) -> str:
    """Write a file until the filesystem says ENOSPC; returns its path."""
    path = os.path.join(directory, "filler")
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    small = b"\0" * 512   # the last part of a page
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(small)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return path


def generate(request_id: str, steps: int) -> bytes:
    return msgpack.packb({"message_type": "generate_sdxl_enhanced", "request_id": request_id,
                          "prompt": "a full disk", "model_base": "tiny-sdxl", "width": 256,
                          "height": 256, "steps": steps, "seed": -1, "stream": True},
                         use_bin_type=True)


class Client:
    """DEALER sockets speaking msgpack; finals kept as the raw bytes the broker sent."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.endpoint = endpoint

    def send(self, frame: bytes) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        sock.send(frame)
        return sock

    @staticmethod
    def next(sock: zmq.Socket, timeout_s: float = 180.0) -> tuple[bytes, dict]:
        assert sock.poll(int(timeout_s * 1000)), "no answer from the broker"
        raw = sock.recv()
        return raw, msgpack.unpackb(raw, raw=False)

    def final(self, sock: zmq.Socket, timeout_s: float = 180.0) -> tuple[bytes, dict]:
        while True:
            raw, message = self.next(sock, timeout_s)
            if message.get("final", True) is not False:
                return raw, message

    def request(self, frame: bytes) -> tuple[bytes, dict]:
        return self.final(self.send(frame))

    def status(self) -> dict:
        _, reply = self.request(msgpack.packb({"message_type": "status_request",
                                               "request_id": os.urandom(4).hex()}))
        return reply["data"]["broker"]


def test_a_full_disk_refuses_new_jobs_and_the_reserve_stores_the_running_jobs_reply(
        start_serve, demo_models_dir, tmp_path, small_disk):
    """The journal's reserve (--journal-reserve-mb) is released when the disk fills: the
    running job's reply is stored at once, so even a restart while the disk is still full
    gives its resend the same reply; new jobs wait for the disk to have room again."""
    argv = one_cpu_worker_argv(demo_models_dir, tmp_path / "out", tmp_path,
                               "--state-dir", str(small_disk), "--journal-reserve-mb", "1")
    sp = start_serve(argv, ready_timeout_s=180)
    client = Client(sp.endpoint)
    try:
        running = client.send(generate("runs-while-full", steps=60))
        while client.next(running)[1].get("stage") != "denoising":
            pass
        filler = fill(small_disk)

        _, refused = client.request(generate("new-while-full", steps=2))
        assert refused["error_code"] == "unavailable", refused
        assert "broker-journal.sqlite3" in refused["error"] and "full" in refused["error"]

        first_raw, first = client.final(running)
        assert first["success"] is True, first
        assert client.status()["unstored_replies"] == 0     # stored in the reserve's room
        _, refused = client.request(generate("new-while-full", steps=2))
        assert refused["error_code"] == "unavailable" and "reserve" in refused["error"], refused
        # (the log is read by a thread: wait for the line rather than race it)
        assert wait_for(lambda: "released the 1 MB reserve" in "".join(sp.stderr_lines))
        assert sp.stop() == 0

        # restarted before the disk was freed: the stored reply, not a second run
        sp = start_serve(argv, ready_timeout_s=180)
        client.endpoint = sp.endpoint
        again_raw, _ = client.request(generate("runs-while-full", steps=60))
        assert again_raw == first_raw

        # room again: the refused job is accepted (the reserve is set aside again first)
        os.remove(filler)
        assert wait_for(lambda: client.request(generate("new-while-full", steps=2))[1]
                        .get("error_code") != "unavailable", timeout_s=30)
        _, done = client.request(generate("new-while-full", steps=2))
        assert done["success"] is True, done
        assert sp.stop() == 0
    finally:
        client.ctx.destroy(linger=0)


def test_a_reply_the_full_disk_cannot_store_is_kept_and_never_run_twice(
        start_serve, demo_models_dir, tmp_path, small_disk):
    """With no reserve (--journal-reserve-mb 0), the reply that cannot be stored is kept in
    memory: its resends get it byte for byte, it is stored once the disk has room, and after a
    restart the resend still gets that one result."""
    argv = one_cpu_worker_argv(demo_models_dir, tmp_path / "out", tmp_path,
                               "--state-dir", str(small_disk), "--journal-reserve-mb", "0")
    sp = start_serve(argv, ready_timeout_s=180)
    client = Client(sp.endpoint)
    try:
        # a job accepted (journalled) while the disk has room, running when the disk fills
        running = client.send(generate("runs-while-full", steps=60))
        while client.next(running)[1].get("stage") != "denoising":
            pass
        filler = fill(small_disk)

        # a new job cannot be journalled: refused at once, naming the journal; nothing queued
        raw, refused = client.request(generate("new-while-full", steps=2))
        assert refused["success"] is False and refused["error_code"] == "unavailable", refused
        assert "broker-journal.sqlite3" in refused["error"] and "full" in refused["error"]
        assert "again later" in refused["error"]

        # the running job finishes: its caller gets the reply; it could not be stored
        first_raw, first = client.final(running)
        assert first["success"] is True, first
        seed = first["data"]["generated_images"][0]["seed"]
        sha = first["data"]["generated_images"][0]["sha256"]
        assert client.status()["unstored_replies"] == 1

        # a resend while the disk is still full: the same reply, from memory (no second run)
        again_raw, _ = client.request(generate("runs-while-full", steps=60))
        assert again_raw == first_raw

        # the disk has room again: the kept reply is stored, the refused job is accepted now
        os.remove(filler)
        assert wait_for(lambda: client.status()["unstored_replies"] == 0, timeout_s=30)
        again_raw, _ = client.request(generate("runs-while-full", steps=60))
        assert again_raw == first_raw
        _, retried = client.request(generate("new-while-full", steps=2))
        assert retried["success"] is True, retried
        assert wait_for(lambda: "kept in memory" in "".join(sp.stderr_lines))
        assert sp.stop() == 0

        # after a restart on the same journal: still that one result, not a re-run
        sp = start_serve(argv, ready_timeout_s=180)
        client.endpoint = sp.endpoint
        after_raw, after = client.request(generate("runs-while-full", steps=60))
        image = after["data"]["generated_images"][0]
        assert (image["seed"], image["sha256"]) == (seed, sha)
        assert after_raw == first_raw
        assert sp.stop() == 0
    finally:
        client.ctx.destroy(linger=0)
