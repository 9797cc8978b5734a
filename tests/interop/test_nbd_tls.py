"""NBD over TLS (x509) between blockgraph and QEMU 7.2, both ways.

A module fixture makes a CA, a server certificate (for ``localhost`` and ``127.0.0.1``), a client
certificate and a second, unrelated CA with ``openssl`` in a temporary directory. Servers start
with ``--fork`` (the parent returns once the socket listens) and stop on SIGTERM, waited for on a
pidfd; nothing here sleeps to synchronise. Error texts are compared with what qemu-img/qemu-io
print in the same situation against qemu-nbd, with the program name and socket paths taken out.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.interop.test_daemon_exports import Daemon  # noqa: E402
from tests.interop.test_nbd_server import BLOCKGRAPH, LIBNBD_PATH, _require, _wait_exit  # noqa: E402

TOOLS = ("qemu-nbd", "qemu-img", "qemu-io", "qemu-storage-daemon", "nbdinfo", "openssl")
MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054


@pytest.fixture(autouse=True)
def _oracles() -> None:
    _require(*TOOLS)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                         env.get("PYTHONPATH", "")])
    return env


def _run(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=_env(),
                          stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc


# -- certificates ---------------------------------------------------------------------------------

_EXTENSIONS = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
"""


# The client's subject, and the distinguished name QEMU's authz objects match it as.
CLIENT_SUBJECT = "/C=GB/L=London/O=Example Org/CN=client"
CLIENT_DN = "C=GB,L=London,O=Example Org,CN=client"


@dataclass(frozen=True)
class PKI:
    server: Path  # ca-cert.pem, server-cert.pem, server-key.pem
    client: Path  # ca-cert.pem, client-cert.pem, client-key.pem
    client_nocert: Path  # ca-cert.pem only
    wrong_ca: Path  # another CA's ca-cert.pem only
    foreign: Path  # another CA's ca-cert.pem, and a client certificate of ours
    encrypted: Path  # server files with the key encrypted by the password "sekrit"


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _make_ca(directory: Path, cnf: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}-key.pem", directory / f"{name}-cert.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-config", str(cnf), "-extensions", "ca")
    return key, cert


def _issue(directory: Path, cnf: Path, ca: tuple[Path, Path], name: str, kind: str,
           serial: int, subject: str) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}-key.pem", directory / f"{name}.csr",
                      directory / f"{name}-cert.pem")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", subject, "-config", str(cnf))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
             "-set_serial", str(serial), "-out", str(cert), "-days", "2",
             "-extfile", str(cnf), "-extensions", kind)
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    _require("openssl")
    root = tmp_path_factory.mktemp("pki")
    work = root / "work"
    work.mkdir()
    cnf = work / "openssl.cnf"
    cnf.write_text(_EXTENSIONS)
    ca = _make_ca(work, cnf, "ca")
    other = _make_ca(work, cnf, "otherca")
    server_key, server_cert = _issue(work, cnf, ca, "server", "server", 1, "/CN=localhost")
    client_key, client_cert = _issue(work, cnf, ca, "client", "client", 2, CLIENT_SUBJECT)
    dirs = {name: root / name
            for name in ("server", "client", "client-nocert", "wrong-ca", "foreign", "encrypted")}
    for directory in dirs.values():
        directory.mkdir()
    for name in ("server", "client", "client-nocert", "encrypted"):
        (dirs[name] / "ca-cert.pem").write_bytes(ca[1].read_bytes())
    (dirs["encrypted"] / "server-cert.pem").write_bytes(server_cert.read_bytes())
    _openssl("pkcs8", "-topk8", "-in", str(server_key), "-out", str(dirs["encrypted"] / "server-key.pem"),
             "-passout", "pass:sekrit", "-v2", "aes-256-cbc")
    for name in ("wrong-ca", "foreign"):
        (dirs[name] / "ca-cert.pem").write_bytes(other[1].read_bytes())
    (dirs["server"] / "server-cert.pem").write_bytes(server_cert.read_bytes())
    (dirs["server"] / "server-key.pem").write_bytes(server_key.read_bytes())
    for name in ("client", "foreign"):
        (dirs[name] / "client-cert.pem").write_bytes(client_cert.read_bytes())
        (dirs[name] / "client-key.pem").write_bytes(client_key.read_bytes())
    return PKI(dirs["server"], dirs["client"], dirs["client-nocert"], dirs["wrong-ca"], dirs["foreign"],
               dirs["encrypted"])


# -- servers ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    kind: str  # "ours" or "qemu"
    pid: int
    sock: Path | None  # unix socket, or None for TCP
    port: int = 0

    def image_opts(self, creds: str | None = "tls0", **extra: str) -> str:
        if self.sock is not None:
            opts = f"driver=nbd,server.type=unix,server.path={self.sock}"
            if creds is not None:
                extra.setdefault("tls-hostname", "localhost")
        else:
            opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={self.port}"
        if creds is not None:
            opts += f",tls-creds={creds}"
        for key, value in extra.items():
            opts += f",{key}={value}"
        return opts

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        _wait_exit(self.pid)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(kind: str, image: Path, *args: str, tls: Path | None = None, tcp: bool = False,
              tls_props: str = "") -> Server:
        n = len(started)
        pid_file = tmp_path / f"{kind}{n}.pid"
        exe = [*BLOCKGRAPH, "nbd"] if kind == "ours" else ["qemu-nbd"]
        cmd = [*exe, "--fork", "--pid-file", str(pid_file), "-t", "-f", "raw", *args]
        sock: Path | None = None
        port = 0
        if tcp:
            port = _free_port()
            cmd += ["-b", "127.0.0.1", "-p", str(port)]
        else:
            sock = tmp_path / f"{kind}{n}.sock"
            cmd += ["-k", str(sock)]
        if tls is not None:
            cmd += ["--object", f"tls-creds-x509,id=tls0,dir={tls},endpoint=server{tls_props}",
                    "--tls-creds", "tls0"]
        # The forked server keeps the stderr it was given: a file, so that nothing waits on
        # a pipe it holds open.
        log = tmp_path / f"{kind}{n}.log"
        with open(log, "w") as err:
            proc = subprocess.run([*cmd, str(image)], stdout=subprocess.DEVNULL, stderr=err,
                                  timeout=60, env=_env(), stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"{cmd}: {log.read_text()}"
        server = Server(kind, int(pid_file.read_text()), sock, port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _image(tmp: Path, name: str = "disk.raw") -> Path:
    img = tmp / name
    _run("qemu-img", "create", "-q", "-f", "raw", str(img), "4M", check=True)
    _run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "write -P 0x11 1M 192k",
         str(img), check=True)
    return img


def _client_object(directory: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={directory},endpoint=client"]


def _message(stderr: str, *paths: object) -> str:
    """stderr without the program name at the start of lines, with paths made neutral."""
    text = re.sub(r"^[\w.-]+: ", "", stderr, flags=re.MULTILINE)
    for path in paths:
        text = text.replace(str(path), "PATH")
    return re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "ADDR", text)


def _qemu_io(pki_dir: Path | None, opts: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = [a for c in commands for a in ("-c", c)]
    objects = _client_object(pki_dir) if pki_dir is not None else []
    return _run("qemu-io", *objects, *args, "--image-opts", opts)


def _our_io(pki_dir: Path | None, opts: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = [a for c in commands for a in ("-c", c)]
    objects = _client_object(pki_dir) if pki_dir is not None else []
    return _run(*BLOCKGRAPH, "io", *objects, *args, "--image-opts", opts)


# -- QEMU's clients against our server ------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_clients_read_write_compare(tmp_path: Path, pki: PKI, servers: Callable[..., Server],
                                         tcp: bool) -> None:
    image = _image(tmp_path)
    server = servers("ours", image, tls=pki.server, tcp=tcp)
    opts = server.image_opts()
    # 1 MiB requests span many TLS records.
    proc = _qemu_io(pki.client, opts, "read -P 0xab 0 64k", "write -P 0x5c 2M 1M",
                    "read -P 0x5c 2M 1M", "read -P 0x11 1M 192k")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("read ") == 3 and "wrote 1048576/1048576 bytes at offset 2097152" in proc.stdout
    # The write is in the image, and the whole export compares equal to it.
    data = image.read_bytes()
    assert data[2 * MiB : 3 * MiB] == b"\x5c" * MiB
    proc = _run("qemu-img", "compare", *_client_object(pki.client), "--image-opts", opts,
                f"driver=raw,file.filename={image}")
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n"), proc.stderr
    info = _run("qemu-img", "info", "--output=json", *_client_object(pki.client), "--image-opts", opts)
    assert info.returncode == 0 and '"virtual-size": 4194304' in info.stdout, info.stderr


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdinfo_over_tls(tmp_path: Path, pki: PKI, servers: Callable[..., Server], tcp: bool) -> None:
    server = servers("ours", _image(tmp_path), tls=pki.server, tcp=tcp)
    if tcp:
        uri = f"nbds://127.0.0.1:{server.port}/?tls-certificates={pki.client}"
    else:
        uri = f"nbds+unix:///?socket={server.sock}&tls-certificates={pki.client}"
    env = dict(os.environ, PYTHONPATH=LIBNBD_PATH)
    proc = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert '"TLS": true' in proc.stdout and '"export-size": 4194304' in proc.stdout
    # Without TLS nbdinfo is refused, as by qemu-nbd.
    refusals = []
    for each in (server, servers("qemu", _image(tmp_path, "other.raw"), tls=pki.server, tcp=tcp)):
        plain = f"nbd+unix:///?socket={each.sock}" if not tcp else f"nbd://127.0.0.1:{each.port}/"
        proc = subprocess.run(["nbdinfo", plain], capture_output=True, text=True, timeout=60, env=env)
        refusals.append((proc.returncode, proc.stderr))
    assert refusals[0][0] == 1 and "nbd_opt_go" in refusals[0][1]
    assert refusals[0] == refusals[1]


def test_storage_daemon_nbd_server_with_tls(tmp_path: Path, pki: PKI) -> None:
    image = _image(tmp_path)
    sock, pid_file = tmp_path / "qsd.sock", tmp_path / "qsd.pid"
    _run(*BLOCKGRAPH, "storage-daemon",
         "--object", f"tls-creds-x509,id=t0,dir={pki.server},endpoint=server",
         "--blockdev", f"driver=file,filename={image},node-name=file0",
         "--blockdev", "driver=raw,file=file0,node-name=disk0",
         "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=t0",
         "--export", "nbd,id=e0,node-name=disk0,writable=on",
         "--pidfile", str(pid_file), "--daemonize", check=True)
    pid = int(pid_file.read_text())
    try:
        opts = f"driver=nbd,server.type=unix,server.path={sock},export=disk0,tls-creds=tls0,tls-hostname=localhost"
        proc = _qemu_io(pki.client, opts, "write -P 0x42 0 4k", "read -P 0x42 0 4k")
        assert proc.returncode == 0, proc.stderr
        proc = _run("qemu-io", "-f", "raw", "-r", "-U", "-c", "read -P 0x42 0 4k", str(image))
        assert proc.returncode == 0, proc.stdout
        plain = _run("qemu-img", "info", f"nbd+unix:///disk0?socket={sock}")
        assert "TLS negotiation required before option 7 (go)" in plain.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
        _wait_exit(pid)


def _qmp_tls_script(pki: PKI, image: Path) -> list[dict[str, Any]]:
    def obj(**props: object) -> dict[str, Any]:
        return {"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", **props}}

    return [
        obj(id="t0", dir="/nonexistent", endpoint="server"),
        obj(id="t0", dir=str(pki.server), endpoint="server", **{"verify-peer": "on"}),
        obj(id="t0", dir=str(pki.server), endpoint="bogus"),
        obj(id="t0", dir=str(pki.server), endpoint="server", bogus=1),
        obj(id="c0", dir=str(pki.client), endpoint="client"),
        obj(id="t0", dir=str(pki.server), endpoint="server"),
        obj(id="t0", dir=str(pki.server), endpoint="server"),
        {"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s0", "data": "x"}},
        {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "disk0",
                                                   "file": {"driver": "file", "filename": str(image)}}},
        {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@DIR@/n.sock"}},
                                                      "tls-creds": "nope"}},
        {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@DIR@/n.sock"}},
                                                      "tls-creds": "s0"}},
        {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@DIR@/n.sock"}},
                                                      "tls-creds": "c0"}},
        {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@DIR@/n.sock"}},
                                                      "tls-creds": "t0"}},
        {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk0",
                                                      "writable": True}},
        # The server keeps the credentials it was given, as QEMU's does.
        {"execute": "object-del", "arguments": {"id": "t0"}},
        {"execute": "object-del", "arguments": {"id": "t0"}},
    ]


def test_qmp_object_add_and_tls_server_match_qsd(tmp_path: Path, pki: PKI) -> None:
    image = _image(tmp_path)
    transcripts = []
    daemons = [Daemon(kind, tmp_path) for kind in ("ours", "qemu")]
    try:
        for daemon in daemons:
            qmp = daemon.qmp()
            replies = []
            for request in _qmp_tls_script(pki, image):
                text = json.dumps(request).replace("@DIR@", str(daemon.dir))
                replies.append(qmp.raw(json.loads(text)))
            qmp.close()
            transcripts.append(json.loads(json.dumps(replies).replace(str(daemon.dir), "DIR")))
            # The export only speaks TLS, with the credentials that were deleted from QOM.
            opts = (f"driver=nbd,server.type=unix,server.path={daemon.dir}/n.sock,export=disk0,"
                    "tls-creds=tls0,tls-hostname=localhost")
            proc = _qemu_io(pki.client, opts, "read -P 0xab 0 64k")
            assert proc.returncode == 0, proc.stderr
            plain = _run("qemu-img", "info", f"nbd+unix:///disk0?socket={daemon.dir}/n.sock")
            assert "TLS negotiation required before option 7 (go)" in plain.stderr
    finally:
        for daemon in daemons:
            daemon.stop()
    assert transcripts[0] == transcripts[1]
    assert transcripts[0][0]["error"]["desc"] == \
        "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"


# -- our client against qemu-nbd -------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_our_client_against_qemu_nbd(tmp_path: Path, pki: PKI, servers: Callable[..., Server],
                                     tcp: bool) -> None:
    image = _image(tmp_path)
    server = servers("qemu", image, tls=pki.server, tcp=tcp)
    opts = server.image_opts()
    proc = _our_io(pki.client, opts, "read -P 0xab 0 64k", "write -P 0x6d 3M 64k", "read -P 0x6d 3M 64k")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 65536/65536 bytes at offset 3145728" in proc.stdout
    # What we wrote reads back through QEMU's own client, and is in the file.
    proc = _qemu_io(pki.client, opts, "read -P 0x6d 3M 64k", "read -P 0x11 1M 192k")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert image.read_bytes()[3 * MiB : 3 * MiB + 65536] == b"\x6d" * 65536
    info = _run(*BLOCKGRAPH, "img", "info", *_client_object(pki.client), "--image-opts", opts)
    assert info.returncode == 0 and "virtual size: 4 MiB (4194304 bytes)" in info.stdout, info.stderr


# -- errors, side by side -----------------------------------------------------------------------------


def _pair(tmp_path: Path, servers: Callable[..., Server], tls: Path | None) -> tuple[Server, Server]:
    image = _image(tmp_path)
    return servers("ours", image, tls=tls), servers("qemu", image, tls=tls)


def test_plain_client_against_tls_server(tmp_path: Path, pki: PKI, servers: Callable[..., Server]) -> None:
    ours, qemu = _pair(tmp_path, servers, pki.server)
    expected = ("Could not open 'nbd+unix:///?socket=PATH': TLS negotiation required before "
                "option 7 (go)\nDid you forget a valid tls-creds?\nserver reported: Option 0x7 "
                "not permitted before TLS\n")
    for server in (ours, qemu):
        proc = _run("qemu-img", "info", f"nbd+unix:///?socket={server.sock}")
        assert proc.returncode == 1
        assert _message(proc.stderr, server.sock) == expected
    proc = _run(*BLOCKGRAPH, "img", "info", f"nbd+unix:///?socket={qemu.sock}")
    assert (proc.returncode, _message(proc.stderr, qemu.sock)) == (1, expected)


def test_tls_client_against_plain_server(tmp_path: Path, pki: PKI, servers: Callable[..., Server]) -> None:
    ours, qemu = _pair(tmp_path, servers, None)
    expected = ("can't open: Denied by server for option 5 (starttls)\n"
                "server reported: TLS not configured\n")
    for server in (ours, qemu):
        proc = _qemu_io(pki.client, server.image_opts(), "read 0 512")
        assert (proc.returncode, _message(proc.stderr)) == (1, expected)
    proc = _our_io(pki.client, qemu.image_opts(), "read 0 512")
    assert (proc.returncode, _message(proc.stderr)) == (1, expected)


@pytest.mark.parametrize("case", ["wrong-ca", "hostname", "no-hostname"])
def test_certificate_checks_match_qemu(tmp_path: Path, pki: PKI, servers: Callable[..., Server],
                                       case: str) -> None:
    ours, qemu = _pair(tmp_path, servers, pki.server)
    directory = pki.wrong_ca if case == "wrong-ca" else pki.client
    extra = {"hostname": {"tls-hostname": "example.com"}, "no-hostname": {}}.get(case, {})
    results = []
    for client, server in ((_qemu_io, ours), (_qemu_io, qemu), (_our_io, qemu), (_our_io, ours)):
        opts = server.image_opts(**extra)
        if case == "no-hostname":
            opts = opts.replace(",tls-hostname=localhost", "")
        proc = client(directory, opts, "read 0 512")
        results.append((proc.returncode, _message(proc.stderr)))
    text = {"wrong-ca": "The certificate hasn't got a known issuer",
            "hostname": "Certificate does not match the hostname example.com",
            "no-hostname": "No hostname for certificate validation"}[case]
    assert results == [(1, f"can't open: {text}\n")] * 4


def test_missing_client_certificate(tmp_path: Path, pki: PKI, servers: Callable[..., Server]) -> None:
    """verify-peer=on (the default) refuses a client without a certificate, after the handshake.

    Which of QEMU's texts a client prints depends on whether its first write or its read meets
    the closed socket first (and how), against qemu-nbd as against us.
    """
    ours, qemu = _pair(tmp_path, servers, pki.server)
    texts = re.compile(r"can't open: Failed to (send option request header: Cannot write to|"
                       r"read option reply: Cannot read from) TLS channel: (Input/output error|"
                       r"Software caused connection abort)\n\Z")
    for client, server in ((_qemu_io, ours), (_qemu_io, qemu), (_our_io, qemu), (_our_io, ours)):
        proc = client(pki.client_nocert, server.image_opts(), "read 0 512")
        assert proc.returncode == 1 and texts.match(_message(proc.stderr)), proc.stderr
    # The server is still there for a client with a certificate.
    assert _qemu_io(pki.client, ours.image_opts(), "read -P 0xab 0 512").returncode == 0


def test_encrypted_key_with_password_secret(tmp_path: Path, pki: PKI, servers: Callable[..., Server]) -> None:
    image = _image(tmp_path)
    server = servers("ours", image, "--object", "secret,id=pw,data=sekrit",
                     tls=pki.encrypted, tls_props=",passwordid=pw")
    proc = _qemu_io(pki.client, server.image_opts(), "read -P 0xab 0 64k")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("authz", "allowed"), [
    (f"authz-simple,id=a0,identity={CLIENT_DN.replace(',', ',,')}", True),
    ("authz-simple,id=a0,identity=CN=someone-else", False),
    (None, False),  # --tls-authz names no object: everyone is refused
    # authz-list: the first matching rule decides, the policy when none matches.
    ("authz-list,id=a0,policy=deny,rules.0.match=*CN=client,rules.0.format=glob,"
     "rules.0.policy=allow", True),
    ("authz-list,id=a0,policy=allow,rules.0.match=C=GB?L=*,rules.0.format=glob,"
     "rules.0.policy=deny,rules.1.match=*,rules.1.format=glob,rules.1.policy=allow", False),
    (f"authz-list,id=a0,policy=deny,rules.0.match={CLIENT_DN.replace(',', ',,')},"
     "rules.0.policy=allow", True),
    ("authz-list,id=a0,policy=deny,rules.0.match=*CN=client,rules.0.policy=allow", False),
    ("authz-list,id=a0,policy=allow", True),
    ("secret,id=a0,data=x", False),  # not an authz object: everyone is refused
], ids=["simple-allowed", "simple-denied", "missing", "list-glob-allowed", "list-glob-denied",
        "list-exact-allowed", "list-exact-is-not-glob", "list-policy-allow", "not-authz"])
def test_tls_authz(tmp_path: Path, pki: PKI, servers: Callable[..., Server], authz: str | None,
                   allowed: bool) -> None:
    image = _image(tmp_path)
    objects = ["--object", authz] if authz is not None else []
    refused = re.compile(r"can't open: Failed to (send option request header: Cannot write to|"
                         r"read option reply: Cannot read from) TLS channel: (Input/output error|"
                         r"Software caused connection abort)\n\Z")
    for kind in ("qemu", "ours"):
        server = servers(kind, image, *objects, "--tls-authz", "a0", tls=pki.server)
        for client in (_qemu_io, _our_io):
            proc = client(pki.client, server.image_opts(), "read -P 0xab 0 4k")
            if allowed:
                assert proc.returncode == 0, (kind, proc.stderr)
            else:
                assert proc.returncode == 1 and refused.match(_message(proc.stderr)), (kind, proc.stderr)


def test_verify_peer_off_accepts_clients_without_certificate(
        tmp_path: Path, pki: PKI, servers: Callable[..., Server]) -> None:
    image = _image(tmp_path)
    for kind in ("ours", "qemu"):
        server = servers(kind, image, tls=pki.server, tls_props=",verify-peer=off")
        proc = _qemu_io(pki.client_nocert, server.image_opts(), "read -P 0xab 0 64k")
        assert proc.returncode == 0, proc.stderr
    proc = _our_io(pki.client_nocert, server.image_opts(), "read -P 0x11 1M 64k")
    assert proc.returncode == 0, proc.stderr


def test_client_verify_peer_off_skips_server_checks(
        tmp_path: Path, pki: PKI, servers: Callable[..., Server]) -> None:
    server = servers("qemu", _image(tmp_path), tls=pki.server, tls_props=",verify-peer=off")
    # A foreign CA and no hostname: with verify-peer=off the client checks nothing.
    opts = server.image_opts().replace(",tls-hostname=localhost", "")
    for run in (_run_qemu_io_noverify, _run_our_io_noverify):
        proc = run(pki.wrong_ca, opts)
        assert proc.returncode == 0, proc.stderr


def _run_qemu_io_noverify(directory: Path, opts: str) -> subprocess.CompletedProcess[str]:
    return _run("qemu-io", "--object", f"tls-creds-x509,id=tls0,dir={directory},endpoint=client,"
                "verify-peer=off", "-c", "read -P 0xab 0 4k", "--image-opts", opts)


def _run_our_io_noverify(directory: Path, opts: str) -> subprocess.CompletedProcess[str]:
    return _run(*BLOCKGRAPH, "io", "--object", f"tls-creds-x509,id=tls0,dir={directory},"
                "endpoint=client,verify-peer=off", "-c", "read -P 0xab 0 4k", "--image-opts", opts)


# -- raw protocol before and after STARTTLS --------------------------------------------------------------


def _recv(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    """Up to ``n`` bytes; fewer when the peer closes (a reset counts as a close)."""
    out = b""
    while len(out) < n:
        try:
            chunk = sock.recv(n - len(out))
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def _option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def _reply(sock: socket.socket | ssl.SSLSocket) -> tuple[int, int, bytes] | None:
    head = _recv(sock, 20)
    if len(head) < 20:
        return None
    _, option, kind, length = struct.unpack(">QIII", head)
    return option, kind, _recv(sock, length)


def _connect(server: Server) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(20)
    sock.connect(str(server.sock))
    assert len(_recv(sock, 18)) == 18
    sock.sendall(struct.pack(">I", 3))
    return sock


def _transcript(server: Server, script: list[tuple[int, bytes]]) -> list[tuple[int, int, bytes] | None]:
    with _connect(server) as sock:
        out = []
        for option, data in script:
            try:
                sock.sendall(_option(option, data))
            except OSError:
                out.append(None)
                break
            reply = _reply(sock)
            out.append(reply)
            if reply is None:
                break
        return out


@pytest.mark.parametrize("script", [
    [(3, b""), (8, b""), (6, b"\0\0\0\0\0\0"), (7, b"\0\0\0\0\0\0"), (99, b""), (2, b""), (3, b"")],
    [(5, b"xx"), (3, b"")],
    [(1, b""), (3, b"")],
], ids=["refused-until-tls", "starttls-with-data", "export-name"])
def test_options_before_tls_match_qemu_nbd(tmp_path: Path, pki: PKI, servers: Callable[..., Server],
                                          script: list[tuple[int, bytes]]) -> None:
    ours, qemu = _pair(tmp_path, servers, pki.server)
    assert _transcript(ours, script) == _transcript(qemu, script)


def test_plain_server_starttls_replies_match_qemu_nbd(tmp_path: Path, servers: Callable[..., Server]) -> None:
    ours, qemu = _pair(tmp_path, servers, None)
    script = [(5, b""), (5, b"xx"), (3, b"")]
    assert _transcript(ours, script) == _transcript(qemu, script)
    assert _transcript(ours, script)[0] == (5, 0x80000002, b"TLS not configured")


def _tls_client(pki: PKI) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.client / "ca-cert.pem"))
    context.load_cert_chain(str(pki.client / "client-cert.pem"), str(pki.client / "client-key.pem"))
    return context


def test_options_after_starttls_match_qemu_nbd(tmp_path: Path, pki: PKI, servers: Callable[..., Server]) -> None:
    ours, qemu = _pair(tmp_path, servers, pki.server)
    transcripts = []
    for server in (ours, qemu):
        with _connect(server) as sock:
            sock.sendall(_option(5))
            assert _reply(sock) == (5, 1, b"")
            with _tls_client(pki).wrap_socket(sock, server_hostname="localhost") as tls:
                steps = []
                for option, data in [(5, b""), (5, b"x"), (8, b""), (3, b""), (7, b"\0\0\0\0\0\0")]:
                    tls.sendall(_option(option, data))
                    steps.append(_reply(tls))
                    if option == 3:
                        steps.append(_reply(tls))
                    if option == 7:
                        while steps[-1] is not None and steps[-1][1] != 1:
                            steps.append(_reply(tls))
                transcripts.append(steps)
    assert transcripts[0] == transcripts[1]
    assert transcripts[0][0] == (5, 0x80000003, b"TLS already enabled")
    assert transcripts[0][-1] == (7, 1, b"")


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x00\x05hello" * 8,  # a record header, then nonsense
    b"NBDMAGIC" + bytes(200),  # plain NBD where TLS was promised
    b"",  # just hang up
], ids=["bad-record", "plaintext", "hangup"])
def test_hostile_bytes_after_starttls_close_only_that_connection(
        tmp_path: Path, pki: PKI, servers: Callable[..., Server], garbage: bytes) -> None:
    ours = servers("ours", _image(tmp_path), tls=pki.server)
    with _connect(ours) as sock:
        sock.sendall(_option(5))
        assert _reply(sock) == (5, 1, b"")
        if garbage:
            sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        rest = _recv(sock, 4096)
        # At most a TLS alert comes back (a record of type 21), never NBD data.
        assert rest == b"" or rest[0] == 21
    proc = _qemu_io(pki.client, ours.image_opts(), "read -P 0xab 0 64k")
    assert proc.returncode == 0, proc.stderr


# -- command-line errors --------------------------------------------------------------------------------


def _bad_dirs(tmp: Path, pki: PKI) -> dict[str, Path]:
    dirs = {}
    garbage_ca = tmp / "garbage-ca"
    garbage_ca.mkdir()
    (garbage_ca / "ca-cert.pem").write_text("junk\n")
    for name in ("server-cert.pem", "server-key.pem"):
        (garbage_ca / name).write_bytes((pki.server / name).read_bytes())
    dirs["GARBAGE_CA"] = garbage_ca
    garbage_key = tmp / "garbage-key"
    garbage_key.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        (garbage_key / name).write_bytes((pki.server / name).read_bytes())
    (garbage_key / "server-key.pem").write_text("junk\n")
    dirs["GARBAGE_KEY"] = garbage_key
    mismatch = tmp / "mismatch"
    mismatch.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        (mismatch / name).write_bytes((pki.server / name).read_bytes())
    (mismatch / "server-key.pem").write_bytes((pki.client / "client-key.pem").read_bytes())
    dirs["MISMATCH"] = mismatch
    dirs["SERVER"] = pki.server
    dirs["CLIENT"] = pki.client
    dirs["NOCERT"] = pki.client_nocert
    dirs["FOREIGN"] = pki.foreign
    dirs["ENCRYPTED"] = pki.encrypted
    return dirs


NBD_CASES = [
    ("--object", "tls-creds-x509,id=t0,dir=/nonexistent,endpoint=server", "--tls-creds", "t0"),
    ("--object", "tls-creds-x509,id=t0,dir=SERVER,endpoint=foo"),
    ("--object", "tls-creds-x509,id=t0,endpoint=server"),
    ("--object", "tls-creds-x509,id=t0,dir=SERVER,verify-peer=maybe"),
    ("--object", "tls-creds-x509,id=t0,dir=SERVER,bogus=1"),
    ("--object", "tls-creds-x509,dir=SERVER"),
    ("--object", "tls-creds-x509,id=0t,dir=SERVER"),
    ("--object", "nosuchtype,id=t0"),
    ("--object", "secret,id=s0,data=x", "--object", "tls-creds-x509,id=s0,dir=SERVER"),
    ("--object", "tls-creds-x509,id=t0,dir=SERVER,endpoint=server,passwordid=nosecret"),
    ("--object", "tls-creds-x509,id=t0,dir=NOCERT,endpoint=server"),
    ("--object", "tls-creds-x509,id=t0,dir=GARBAGE_CA,endpoint=server"),
    ("--object", "tls-creds-x509,id=t0,dir=GARBAGE_KEY,endpoint=server"),
    ("--object", "tls-creds-x509,id=t0,dir=MISMATCH,endpoint=server"),
    ("--object", "tls-creds-x509,id=t0,dir=FOREIGN,endpoint=client"),
    ("--object", "tls-creds-x509,id=t0,dir=ENCRYPTED,endpoint=server"),
    ("--object", "secret,id=pw,data=wrong", "--object",
     "tls-creds-x509,id=t0,dir=ENCRYPTED,endpoint=server,passwordid=pw"),
    ("--object", "secret,id=pw,data=sekrit", "--object",
     "tls-creds-x509,id=t0,dir=ENCRYPTED,endpoint=server,passwordid=pw", "--tls-creds", "none"),
    ("--object", "tls-creds-x509,id=t0,dir=FOREIGN,endpoint=client,sanity-check=off",
     "--tls-creds", "t0"),
    ("--object", "tls-creds-x509,id=t0,dir=CLIENT,endpoint=client", "--tls-creds", "t0"),
    ("--object", "tls-creds-x509,id=t0,dir=SERVER,endpoint=server", "--tls-creds", "t1"),
    ("--object", "secret,id=t0,data=x", "--tls-creds", "t0"),
    ("--object", "secret,id=s0"),
    ("--tls-authz", "a0"),
    ("--tls-hostname", "h"),
    ("--object", "tls-creds-x509,id=t0,dir=SERVER,endpoint=server", "--tls-creds", "t0",
     "--tls-hostname", "h"),
]


@pytest.mark.parametrize("case", NBD_CASES, ids=[" ".join(c) for c in NBD_CASES])
def test_qemu_nbd_errors_match(tmp_path: Path, pki: PKI, case: tuple[str, ...]) -> None:
    dirs = _bad_dirs(tmp_path, pki)
    args = [re.sub(r"dir=([A-Z_]+)", lambda m: f"dir={dirs[m.group(1)]}", a) for a in case]
    image = _image(tmp_path)
    results = []
    for exe in (["qemu-nbd"], [*BLOCKGRAPH, "nbd"]):
        proc = _run(*exe, "-k", str(tmp_path / "never.sock"), "-f", "raw", *args, str(image))
        results.append((proc.returncode, _message(proc.stderr, tmp_path)))
    assert results[0][0] == 1
    assert results[1] == results[0]


DAEMON_CASES = [
    ("--object", "tls-creds-x509,id=t0,dir=/nonexistent,endpoint=server"),
    ("--object", "tls-creds-x509,id=t0,dir=SERVER,endpoint=foo"),
    ("--object", "tls-creds-x509,id=t0"),
    ("--object", "tls-creds-x509,id=t0,dir=MISMATCH,endpoint=server"),
    ("--object", "tls-creds-x509,id=t0,dir=CLIENT", "--nbd-server", "addr.type=unix,addr.path=SOCK,tls-creds=t0"),
    ("--nbd-server", "addr.type=unix,addr.path=SOCK,tls-creds=t0"),
    ("--object", "secret,id=t0,data=x", "--nbd-server", "addr.type=unix,addr.path=SOCK,tls-creds=t0"),
]


@pytest.mark.parametrize("case", DAEMON_CASES, ids=[" ".join(c) for c in DAEMON_CASES])
def test_storage_daemon_errors_match(tmp_path: Path, pki: PKI, case: tuple[str, ...]) -> None:
    dirs = _bad_dirs(tmp_path, pki)
    results = []
    for exe in (["qemu-storage-daemon"], [*BLOCKGRAPH, "storage-daemon"]):
        sock = tmp_path / f"{exe[0].rsplit('/', 1)[-1]}.sock"
        args = [re.sub(r"dir=([A-Z_]+)", lambda m: f"dir={dirs[m.group(1)]}", a).replace("SOCK", str(sock))
                for a in case]
        proc = _run(*exe, *args)
        text = _message(proc.stderr, sock, tmp_path)
        results.append((proc.returncode, text))
    assert results[0][0] == 1
    assert results[1] == results[0]


@pytest.mark.parametrize("tool", ["nbd", "img", "io", "storage-daemon"])
@pytest.mark.parametrize("value", ["help", "tls-creds-x509,help", "authz-list,help",
                                   "authz-list-file,help", "authz-pam,help", "bogus,help"])
def test_object_help_matches(tmp_path: Path, tool: str, value: str) -> None:
    image = _image(tmp_path)
    qemu = {"nbd": ["qemu-nbd"], "img": ["qemu-img", "info"], "io": ["qemu-io"],
            "storage-daemon": ["qemu-storage-daemon"]}[tool]
    ours = [*BLOCKGRAPH, *tool.split(), *qemu[1:]]
    tail = [] if tool == "storage-daemon" else [str(image)]
    expected = _run(*qemu, "--object", value, *tail)
    got = _run(*ours, "--object", value, *tail)
    assert expected.returncode == 0
    assert "options:" in expected.stdout or "tls-creds-x509" in expected.stdout
    assert (got.returncode, got.stdout) == (0, expected.stdout)


# Option checks of the authz objects, in QEMU's order and words (keyval and JSON paths differ).
AUTHZ_OBJECT_CASES = [
    "authz-list,id=a,policy=bogus",
    "authz-list,id=a,policy=allow,rules.0.match=x",
    "authz-list,id=a,rules.0.policy=allow",
    "authz-list,id=a,rules.0.match=x,rules.0.policy=maybe",
    "authz-list,id=a,rules.0.match=x,rules.0.policy=allow,rules.0.format=regex",
    "authz-list,id=a,rules.0.match=x,rules.0.policy=allow,rules.0.bogus=1",
    "authz-list,id=a,rules.1.match=x,rules.1.policy=allow",
    "authz-list,id=a,rules=x",
    "authz-list,id=a,rules.0=x",
    "authz-list,id=a,rules.0.match.x=1,rules.0.policy=allow",
    "authz-list,id=1a",
    "authz-list-file,id=a",
    "authz-listfile,id=a",
    "authz-listfile,id=a,filename=x,refresh=maybe",
    "authz-listfile,id=a,filename=x",
    "authz-pam,id=a",
    "authz-pam,id=a,service=x",
    "tls-creds-x509,id=t,dir.x=1",
    '{"qom-type":"authz-list","id":"a","rules":{"match":"x"}}',
    '{"qom-type":"authz-list","id":"a","rules":[1]}',
    '{"qom-type":"authz-list","id":"a","rules":[{"match":1,"policy":"allow"}]}',
    '{"qom-type":"authz-list","id":"a","rules":[{"match":"x"}]}',
    '{"qom-type":"authz-list","id":"a","rules":[{"match":"x","policy":"allow","bogus":1}]}',
]


@pytest.mark.parametrize("value", AUTHZ_OBJECT_CASES)
def test_authz_object_errors_match(tmp_path: Path, value: str) -> None:
    image = _image(tmp_path)
    expected = _run("qemu-img", "info", "--object", value, str(image))
    got = _run(*BLOCKGRAPH, "img", "info", "--object", value, str(image))
    assert expected.returncode == 1
    assert (got.returncode, got.stderr.replace("blockgraph-img", "qemu-img")) == (1, expected.stderr)
