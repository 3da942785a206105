"""
The NoCloud seed: what a VM's cloud-init reads at boot (CONTRACT §8).

A seed is an ISO 9660 volume labelled ``cidata`` holding ``meta-data`` (``instance-id``,
``local-hostname``) and ``user-data``, the layout cloud-init's NoCloud datasource finds on
any block device with that label, so stock cloud images pick it up unchanged.  The SSH
keys and the caller's ``user_data`` both reach cloud-init: alone, each is the whole
``user-data``; together they are a MIME multipart document, the caller's part first and
ours second, merged so that our keys are appended to any the caller lists.

The volume is written with pycdlib (pure Python, maintained, no subprocess and no Debian
package needed on the node), with Joliet and Rock Ridge names as ``genisoimage -J -R``
would write them.

This module also checks what goes into a seed: keys, host names, user data.
"""

from __future__ import annotations

import base64
import binascii
import email.charset
import email.mime.multipart
import email.mime.nonmultipart
import email.parser
import email.policy
import hashlib
import io
import json
import os
import re

import pycdlib

#: CONTRACT §8 bounds.
MAX_KEYS = 32
MAX_KEY_BYTES = 8 * 1024
MAX_USER_DATA = 64 * 1024

SEED = "seed.iso"
KEY_TYPES = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ssh-dss|ecdsa-sha2-[a-z0-9]+|sk-[a-z0-9@.-]+)$"
)
HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# cloud-init's own table (cloudinit/handlers/__init__.py INCLUSION_TYPES_MAP): the first
# line of a user-data document decides its MIME type.
_STARTS = (
    ("#cloud-config-archive", "text/cloud-config-archive"),
    ("#cloud-config-jsonp", "text/cloud-config-jsonp"),
    ("#cloud-config", "text/cloud-config"),
    ("#cloud-boothook", "text/cloud-boothook"),
    ("#include-once", "text/x-include-once-url"),
    ("#include", "text/x-include-url"),
    ("#part-handler", "text/part-handler"),
    ("#upstart-job", "text/upstart-job"),
    ("## template: jinja", "text/jinja2"),
    ("#!", "text/x-shellscript"),
)
# Our keys are appended to the caller's lists rather than replacing them (cloud-init's
# default merge replaces lists).
_MERGE = "dict(recurse_array,no_replace)+list(append)"


class SeedError(ValueError):
    """A value that may not go into a seed; ``param`` names the bad parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def key_fingerprint(line: str) -> str:
    """
    Check one OpenSSH public key line and return its fingerprint.

    :param line: ``<type> <base64> [comment]``
    :return: ``SHA256:<base64>``, as ``ssh-keygen -l`` prints it
    :raise SeedError: when the line is not such a key
    """
    if not isinstance(line, str) or len(line.encode()) > MAX_KEY_BYTES:
        raise SeedError("ssh_keys", f"a key is at most {MAX_KEY_BYTES} bytes")
    if "\n" in line or "\r" in line:
        raise SeedError("ssh_keys", "a key is one line")
    parts = line.split()
    if len(parts) < 2 or not KEY_TYPES.match(parts[0]):
        raise SeedError(
            "ssh_keys",
            "a key is an OpenSSH public key line: ssh-ed25519, ssh-rsa, ecdsa-sha2-* or "
            "sk-* followed by base64",
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise SeedError(
            "ssh_keys", f"the base64 part of a {parts[0]} key does not decode"
        ) from None
    # The blob starts with its own type as an SSH string: a key pasted under the wrong
    # type, or truncated, fails here rather than in the guest.
    if len(blob) < 4 or blob[4 : 4 + int.from_bytes(blob[:4], "big")] != parts[0].encode():
        raise SeedError("ssh_keys", f"a {parts[0]} key's data does not match its type")
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return "SHA256:" + digest


def check_keys(keys: list[str]) -> list[str]:
    """
    :param keys: a list of OpenSSH public key lines
    :return: their fingerprints
    :raise SeedError: when there are too many or one does not parse
    """
    if len(keys) > MAX_KEYS:
        raise SeedError("ssh_keys", f"at most {MAX_KEYS} keys")
    return [key_fingerprint(key) for key in keys]


def check_user_data(user_data: str) -> None:
    """
    :param user_data: cloud-init user data
    :raise SeedError: when it is over 64 KiB (UTF-8)
    """
    if len(user_data.encode()) > MAX_USER_DATA:
        raise SeedError("user_data", f"user_data is at most {MAX_USER_DATA} bytes")


def check_hostname(hostname: str) -> None:
    """
    :param hostname: a host name
    :raise SeedError: unless it is one RFC 1123 label in lower case
    """
    if not HOSTNAME.match(hostname):
        raise SeedError(
            "hostname",
            f"hostname {hostname!r} is not a lower-case host label "
            "([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)",
        )


def meta_data(vm_id: str, hostname: str) -> bytes:
    """
    :return: the ``meta-data`` document
    """
    return f"instance-id: {vm_id}\nlocal-hostname: {hostname}\n".encode()


def user_data_document(ssh_keys: list[str], user_data: str | None) -> bytes:
    """
    :param ssh_keys: OpenSSH public key lines (checked)
    :param user_data: the caller's user data, or ``None``
    :return: the ``user-data`` document
    """
    ours = None
    if ssh_keys:
        # JSON strings are YAML double-quoted scalars.
        ours = "#cloud-config\nssh_authorized_keys:\n" + "".join(
            f"  - {json.dumps(key)}\n" for key in ssh_keys
        )
    if user_data is None:
        return (ours or "#cloud-config\n{}\n").encode()
    if ours is None:
        return user_data.encode()
    outer = email.mime.multipart.MIMEMultipart()
    for part in _caller_parts(user_data):
        outer.attach(part)
    mine = _text_part(ours, "text/cloud-config", "hero-compute-keys.cfg")
    mine["Merge-Type"] = _MERGE
    outer.attach(mine)
    return outer.as_bytes(policy=email.policy.compat32.clone(linesep="\n"))


def _caller_parts(user_data):
    if user_data.lstrip().lower().startswith("content-type: multipart"):
        message = email.parser.Parser().parsestr(user_data)
        if message.is_multipart():
            return list(message.get_payload())
    kind = next(
        (mime for start, mime in _STARTS if user_data.startswith(start)), "text/plain"
    )
    return [_text_part(user_data, kind, "user-data")]


def _text_part(text, kind, filename):
    maintype, subtype = kind.split("/")
    part = email.mime.nonmultipart.MIMENonMultipart(maintype, subtype, charset="utf-8")
    # Unencoded (8bit) rather than base64, so the document reads as it was written.
    charset = email.charset.Charset("utf-8")
    charset.body_encoding = None  # type: ignore[assignment]  # None: 8bit
    part.set_payload(text, charset)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def write_seed(
    path: str, vm_id: str, hostname: str, ssh_keys: list[str], user_data: str | None
) -> None:
    """
    Write a VM's seed volume, replacing any earlier one atomically.

    :param path: where the ISO goes
    :param vm_id: the instance id
    :param hostname: the VM's host name
    :param ssh_keys: OpenSSH public key lines
    :param user_data: the caller's user data, or ``None``
    """
    files = (
        ("METADATA.;1", "meta-data", meta_data(vm_id, hostname)),
        ("USERDATA.;1", "user-data", user_data_document(ssh_keys, user_data)),
        ("VENDORDA.;1", "vendor-data", b"#cloud-config\n{}\n"),
    )
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for iso_name, name, data in files:
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            "/" + iso_name,
            rr_name=name,
            joliet_path="/" + name,
        )
    partial = path + ".partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        iso.write_fp(f)
    iso.close()
    os.replace(partial, path)
