"""CURVE keys (pyzmq's certificate format, zmq.auth): made, loaded and put on a socket,
the client's and the server's. The receiver's gatekeeper is pushpull/gatekeeper.py."""

import os

import zmq
import zmq.auth


class KeyFileError(Exception):
    """A certificate file is missing, unreadable or of the wrong kind."""


SECRET_FILE_MODE = 0o600  # a secret key file is readable by its owner only


def generate_keys(directory):
    """Write server and client certificates (public and secret) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name in ("server", "client"):
        secret = os.path.join(directory, f"{name}.key_secret")
        # zmq.auth writes with open("w"), which keeps an existing file's mode: made
        # private first, the secret is never readable by others, not even for a moment.
        os.close(os.open(secret, os.O_WRONLY | os.O_CREAT, SECRET_FILE_MODE))
        os.chmod(secret, SECRET_FILE_MODE)
        paths += zmq.auth.create_certificates(directory, name)
    return paths


def load_secret_certificate(path):
    """(public, secret) keys from a *.key_secret file."""
    public, secret = _load_certificate(path)
    if not secret:
        raise KeyFileError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_key(path):
    """The public key from a certificate file (.key or .key_secret)."""
    return _load_certificate(path)[0]


def load_client_keys(secret_path, server_public_path):
    """The sender's CURVE keys (public, secret, server public), or None without a secret
    certificate; KeyFileError if a certificate is unusable."""
    if not secret_path:
        return None
    public, secret = load_secret_certificate(secret_path)
    return public, secret, load_public_key(server_public_path)


def _load_certificate(path):
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read certificate {path}: {exc}") from None


def apply_client_keys(sock, keys):
    """Make `sock` a CURVE client: keys is (public, secret, server public), or None for none."""
    if keys:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys


# ---------------------------------------------------------------------------
# The receiver's keys
# ---------------------------------------------------------------------------
ZAP_DOMAIN = "global"  # the ZAP domain the receiver's sockets and the authenticator share


def load_server_keys(secret_path, allow_dir):
    """The receiver's CURVE keys (public, secret) from its secret certificate, or None
    without one; KeyFileError if it, or the directory of allowed clients, is unusable."""
    if allow_dir and not os.path.isdir(allow_dir):
        raise KeyFileError(f"--curve-allow {allow_dir} is not a directory")
    return load_secret_certificate(secret_path) if secret_path else None


def apply_server_security(sock, server_keys):
    """Put a server socket under the gatekeeper, and CURVE when server_keys (public, secret)."""
    # With a ZAP domain every peer passes the authenticator, and libzmq refuses
    # ZMTP/1.0 peers: without it, raw bytes on the port are read as old-protocol
    # frames and can come out as messages.
    sock.zap_domain = ZAP_DOMAIN.encode()
    if server_keys:
        sock.curve_publickey, sock.curve_secretkey = server_keys
        sock.curve_server = True
