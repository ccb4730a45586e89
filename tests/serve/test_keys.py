"""`sdxl-broker keys DIR`: CURVE key pairs zmq.auth can load, secret halves private."""

import os
import stat

import pytest
import zmq.auth

from runtime.curve import make_keys


def test_keys_are_loadable_pairs_and_never_overwritten(tmp_path):
    pairs = make_keys(str(tmp_path / "keys"), ["server", "client"])
    for name, (public_file, secret_file) in pairs.items():
        public, secret = zmq.auth.load_certificate(secret_file)
        assert public == zmq.auth.load_certificate(public_file)[0] and len(public) == 40
        assert secret is not None and len(secret) == 40
        assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    assert pairs["server"][0] != pairs["client"][0]
    before = open(pairs["server"][1]).read()
    with pytest.raises(FileExistsError, match="--force"):
        make_keys(str(tmp_path / "keys"), ["server"])
    assert open(pairs["server"][1]).read() == before
    make_keys(str(tmp_path / "keys"), ["server"], force=True)
    assert open(pairs["server"][1]).read() != before


def test_key_names_cannot_escape_the_directory(tmp_path):
    with pytest.raises(ValueError):
        make_keys(str(tmp_path), ["../evil"])
