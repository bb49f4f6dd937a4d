"""`saestream keygen DIR`: a CURVE key pair for a producer or a consumer."""

from __future__ import annotations

import os
from pathlib import Path

import click

from saestream.common.errors import UserError, cli_errors
from saestream.common.settings import GivenPath


def write_keypair(directory: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write DIR/NAME.key (public) and DIR/NAME.key_secret (pair, mode 0600), zmq.auth format.

    Refuses to overwrite an existing pair unless `force`. Returns (public_file, secret_file).
    """
    import zmq.auth

    if not name or "/" in name or name.startswith(".") or not name.isprintable() or \
            len(f"{name}.key_secret".encode(errors="surrogateescape")) > 255:
        raise UserError(f"bad key name {name!r}: use a plain file name such as 'producer-1'")
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise UserError(f"{public} or {secret} already exists (use --force to replace)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Create the secret file ourselves first so it is never world-readable, even briefly.
        for path in (public, secret):
            path.unlink(missing_ok=True)
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        made_public, made_secret = zmq.auth.create_certificates(directory, name)
        os.chmod(made_secret, 0o600)
    except OSError as exc:
        raise UserError(f"cannot write keys into {directory}: {exc}") from exc
    return Path(made_public), Path(made_secret)


@click.command()
@click.argument("directory", type=GivenPath(file_okay=False, path_type=Path))
@click.option("--name", default="saestream", show_default=True,
              help="Base name of the files: NAME.key (public) and NAME.key_secret (secret).")
@click.option("--force", is_flag=True, help="Replace an existing key pair of that name.")
@cli_errors
def keygen(directory: Path, name: str, force: bool) -> None:
    """Write a CURVE key pair into DIRECTORY (created if missing).

    Give a producer its NAME.key_secret (--curve-secret-key) and the consumer's public key
    (--curve-server-key); give the consumer its own NAME.key_secret and a directory holding
    the public NAME.key of every producer it admits (--curve-authorized-dir).
    """
    public, secret = write_keypair(directory, name, force=force)
    click.echo(f"public key: {public}")
    click.echo(f"secret key: {secret} (keep private)")
