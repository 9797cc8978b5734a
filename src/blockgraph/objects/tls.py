"""``tls-creds-x509``: x509 credentials from a directory of PEM files, as Python ``ssl`` contexts.

QEMU 7.2 reads, in this order (``dir`` is required):

* ``ca-cert.pem`` always (a missing file is an error even with ``verify-peer=off``),
  ``ca-crl.pem`` if present;
* server endpoint: ``server-cert.pem`` and ``server-key.pem`` (required), ``dh-params.pem``
  (optional);
* client endpoint: ``client-cert.pem`` and ``client-key.pem`` (both optional; used when both
  exist).

With ``sanity-check=on`` (the default) the certificates must be PEM, and our own certificate
must verify against ``ca-cert.pem`` (QEMU: ``Our own certificate ... failed validation
against ...``); Python's ``ssl`` cannot verify a certificate on its own, so this runs one TLS
handshake in memory between two contexts holding the certificate and key, after the key is
loaded (QEMU checks before loading the key, so a bad key and a foreign certificate together
are reported the other way round).

``passwordid`` names a ``secret`` holding the key's password; it is looked up only when a key is
loaded. Everything is read when the object is created, so bad files fail the ``--object``
option, as in QEMU. ``priority`` is a GnuTLS priority string: it is kept but has no OpenSSL
equivalent, so the defaults of Python's ``ssl`` apply. QEMU's separate checks of certificate
times, basic constraints and key usages are not made beyond what OpenSSL's verification does.
"""

from __future__ import annotations

import errno as _errno
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockgraph.errors import BlockError
from blockgraph.objects import UserObject

if TYPE_CHECKING:
    from blockgraph.objects import ObjectRegistry

__all__ = ["TlsCredsX509", "check_psk_files", "peer_distinguished_name", "verify_error_text"]

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
DH_PARAMS = "dh-params.pem"
PSK_KEYS = "keys.psk"

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
# GnuTLS's message for a file without a PEM header.
_NO_PEM = "Base64 unexpected header error."


def _path(directory: str, name: str, required: bool) -> str | None:
    """QEMU's qcrypto_tls_creds_get_path: a readable file, or None if optional and absent."""
    path = f"{directory}/{name}"
    if os.access(path, os.R_OK):
        return path
    err = _errno.EACCES
    try:
        os.stat(path)
    except OSError as exc:
        err = exc.errno or _errno.ENOENT
    if not required and err == _errno.ENOENT:
        return None
    raise BlockError(f"Unable to access credentials {path}: {os.strerror(err)}")


def check_psk_files(props: Mapping[str, Any]) -> None:
    """``tls-creds-psk``: QEMU's checks of ``dir`` and its ``keys.psk`` (the keys are not used)."""
    directory = props.get("dir")
    if directory is None:
        raise BlockError("Missing 'dir' property value")
    _path(str(directory), PSK_KEYS, True)
    if props.get("endpoint") == "server":
        _path(str(directory), DH_PARAMS, False)


# OpenSSL's attribute names as GnuTLS prints them in a distinguished name.
_DN_NAMES = {
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
    "organizationName": "O", "organizationalUnitName": "OU", "commonName": "CN",
    "domainComponent": "DC", "userId": "UID", "emailAddress": "EMAIL",
}


def _dn_escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def peer_distinguished_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The verified peer certificate's subject as GnuTLS (and so QEMU's authz) writes it.

    The RDNs in the certificate's order (not RFC 4514's reversed one): a subject made with
    ``/C=GB/O=Example Org/CN=client`` is ``C=GB,O=Example Org,CN=client``.
    """
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    subject: Any = cert.get("subject", ())  # ((("commonName", "client"),), ...)
    rdns = []
    for rdn in subject:
        rdns.append("+".join(f"{_DN_NAMES.get(str(name), str(name))}={_dn_escape(str(value))}"
                             for name, value in rdn))
    return ",".join(rdns)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise BlockError(f"Unable to access credentials {path}: {exc.strerror}") from None


def _pem_certificates(data: bytes) -> int:
    """How many well-formed PEM certificates ``data`` holds."""
    count = 0
    text = data.decode("ascii", "replace")
    for block in text.split("-----BEGIN CERTIFICATE-----")[1:]:
        body, end, _ = block.partition("-----END CERTIFICATE-----")
        if not end:
            return 0
        try:
            ssl.PEM_cert_to_DER_cert("-----BEGIN CERTIFICATE-----" + body + "-----END CERTIFICATE-----\n")
        except ValueError:
            return 0
        count += 1
    return count


def _key_error_text(exc: ssl.SSLError, key: str) -> str:
    """GnuTLS's reason for a certificate/key pair it cannot load, from OpenSSL's."""
    reason = f"{exc.reason or ''} {exc}".upper()
    if "KEY_VALUES_MISMATCH" in reason:
        return "The certificate and the given key do not match."
    # OpenSSL only says "PEM lib" for a wrong or missing password.
    if "BAD DECRYPT" in reason or "BAD_DECRYPT" in reason or b"ENCRYPTED" in _read(key):
        return "Decryption has failed."
    return "The requested data were not available."


def verify_error_text(exc: ssl.SSLCertVerificationError, hostname: str | None) -> str:
    """QEMU's text for a peer certificate that failed verification."""
    code = exc.verify_code
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return f"Certificate does not match the hostname {hostname}"
    if code in (2, 18, 19, 20, 21):  # issuer unknown, self-signed, chain not verifiable
        return "The certificate hasn't got a known issuer"
    if code == 23:  # X509_V_ERR_CERT_REVOKED
        return "The certificate has been revoked"
    return "The certificate is not trusted"


def _verify_own(cert: str, key: str, ca: str, password: bytes, server: bool) -> str | None:
    """Why our own certificate does not verify against ``ca``, or None if it does.

    The peer that checks it plays the role that checks such certificates in real use (a
    client checks a server certificate, a server a client one), so that OpenSSL applies the
    matching purpose.
    """
    holder = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    checker = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if server else ssl.PROTOCOL_TLS_SERVER)
    holder.load_cert_chain(cert, key, password=lambda: password)
    checker.load_verify_locations(cafile=ca)
    checker.verify_mode = ssl.CERT_REQUIRED
    checker.check_hostname = False
    if server:
        holder.check_hostname = False
    else:
        # A server must present some certificate; the holder does not look at it.
        holder.check_hostname = False
        holder.verify_mode = ssl.CERT_NONE
        checker.load_cert_chain(cert, key, password=lambda: password)
    pairs = [(holder, ssl.MemoryBIO(), ssl.MemoryBIO(), server),
             (checker, ssl.MemoryBIO(), ssl.MemoryBIO(), not server)]
    ends = [ctx.wrap_bio(inc, out, server_side=side) for ctx, inc, out, side in pairs]
    done = [False, False]
    for _ in range(20):  # a handshake takes a handful of round trips
        for i, end in enumerate(ends):
            if done[i]:
                continue
            try:
                end.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                return verify_error_text(exc, None) if i == 1 else None
            except ssl.SSLError as exc:
                if i == 1:
                    return str(exc.reason or exc)
                # The holder sees the checker's alert; the checker's error is the reason.
            _, inc_other, _, _ = pairs[1 - i]
            inc_other.write(pairs[i][2].read())
        if all(done):
            return None
    return None


def _password(registry: ObjectRegistry, passwordid: str | None) -> bytes:
    if passwordid is None:
        return b""
    data = registry.secret(passwordid).data
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise BlockError(f"Data from secret {passwordid} is not valid UTF-8") from None
    return data


@dataclass
class TlsCredsX509(UserObject):
    """Credentials for one endpoint; :attr:`context` is ready for a TLS handshake."""

    dir: str = ""
    endpoint: str = "client"
    verify_peer: bool = True
    priority: str | None = None
    context: ssl.SSLContext = field(default_factory=lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))

    @property
    def is_server(self) -> bool:
        return self.endpoint == "server"

    def peer_certificate_missing(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bool:
        """Whether a finished handshake lacks the client certificate ``verify-peer`` demands."""
        if not self.verify_peer:
            return False
        return ssl_object is None or not ssl_object.getpeercert()

    @classmethod
    def create(cls, ident: str, props: Mapping[str, Any], registry: ObjectRegistry) -> TlsCredsX509:
        """Build the credentials from checked ``props`` (QEMU's member names).

        :raise BlockError: QEMU's text for a missing or unreadable file.
        """
        directory = props.get("dir")
        if directory is None:
            raise BlockError("Missing 'dir' property value")
        endpoint = str(props.get("endpoint", "client"))
        verify_peer = bool(props.get("verify-peer", True))
        sanity_check = bool(props.get("sanity-check", True))
        server = endpoint == "server"
        ca = _path(directory, CA_CERT, True)
        assert ca is not None
        crl = _path(directory, CA_CRL, False)
        cert = _path(directory, SERVER_CERT if server else CLIENT_CERT, server)
        key = _path(directory, SERVER_KEY if server else CLIENT_KEY, server)
        dh = _path(directory, DH_PARAMS, False) if server else None
        if sanity_check:
            if not _pem_certificates(_read(ca)):
                raise BlockError(f"Unable to import CA certificate list {ca}")
            if cert is not None and not _pem_certificates(_read(cert)):
                raise BlockError(f"Unable to import {endpoint} certificate {cert}: {_NO_PEM}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError:
            raise BlockError(f"Cannot load CA certificate '{ca}': Error in parsing.") from None
        if cert is not None and key is not None:
            password = _password(registry, props.get("passwordid"))
            try:
                # A callable password: OpenSSL must never prompt on the terminal.
                context.load_cert_chain(cert, key, password=lambda: password)
            except ssl.SSLError as exc:
                raise BlockError(f"Cannot load certificate '{cert}' & key '{key}': "
                                 f"{_key_error_text(exc, key)}") from None
            if sanity_check:
                reason = _verify_own(cert, key, ca, password, server)
                if reason is not None:
                    raise BlockError(f"Our own certificate {cert} failed validation against "
                                     f"{ca}: {reason}")
        if crl is not None:
            try:
                context.load_verify_locations(cafile=crl)
            except ssl.SSLError:
                raise BlockError(f"Cannot load CRL '{crl}': Error in parsing.") from None
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if dh is not None:
            if b"-----BEGIN" not in _read(dh):
                raise BlockError(f"Unable to load DH parameters from {dh}: {_NO_PEM}")
            try:
                context.load_dh_params(dh)
            except ssl.SSLError:
                raise BlockError(f"Unable to load DH parameters from {dh}: Error in parsing.") from None
        if server:
            # QEMU asks for a client certificate and checks its presence after the handshake,
            # closing the socket without an alert when there is none (see
            # ``peer_certificate_missing``); a certificate that is sent is verified here.
            context.verify_mode = ssl.CERT_OPTIONAL if verify_peer else ssl.CERT_NONE
            # NBD clients never resume sessions; tickets would only be bytes in flight when a
            # refused client is cut off.
            context.num_tickets = 0
        else:
            # The hostname is checked by the client against tls-hostname or the server address.
            context.check_hostname = verify_peer
            context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
        priority = props.get("priority")
        return cls("tls-creds-x509", ident, directory, endpoint, verify_peer,
                   None if priority is None else str(priority), context)
