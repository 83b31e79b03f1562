"""CURVE keys (pyzmq's certificate format, zmq.auth)."""

import os

class KeyFileError(Exception):
    """A certificate file is missing, unreadable or of the wrong kind."""


def generate_keys(directory):
    """Write server and client certificates (public and secret) into `directory`."""
    import zmq.auth
    os.makedirs(directory, exist_ok=True)
    return [path for name in ("server", "client")
            for path in zmq.auth.create_certificates(directory, name)]


def load_secret_certificate(path):
    """(public, secret) keys from a *.key_secret file."""
    public, secret = _load_certificate(path)
    if not secret:
        raise KeyFileError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_key(path):
    """The public key from a certificate file (.key or .key_secret)."""
    return _load_certificate(path)[0]


def _load_certificate(path):
    import zmq.auth
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read certificate {path}: {exc}") from None


def apply_client_keys(sock, keys):
    """Make `sock` a CURVE client: keys is (public, secret, server public), or None for none."""
    if keys:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
