"""Client-side files that `fedmq broker init` writes for an identity, as pure text builders."""

from __future__ import annotations

from pathlib import Path


def mosquitto_sub_defaults(
    host: str, port: int, ca_file: Path, identity_dir: Path, username: str, password: str
) -> str:
    """``$XDG_CONFIG_HOME/mosquitto_sub``: default options, one ``-option value`` a line.

    mosquitto_sub has no password-file flag; this file (mode 0600) keeps the password off the
    command line, where ``ps`` and the shell history would show it (mosquitto_sub(1), FILES).
    """
    lines = [
        f"# mosquitto_sub defaults of the {username} identity (mode 0600: holds its password)",
        f"# use: XDG_CONFIG_HOME={identity_dir} mosquitto_sub -v -t 'fl/#'",
        f"-h {host}",
        f"-p {port}",
        f"--cafile {ca_file}",
        f"--cert {identity_dir / 'client.crt'}",
        f"--key {identity_dir / 'client.key'}",
        f"-u {username}",
        f"-P {password}",
    ]
    return "\n".join(lines) + "\n"
