"""``geartask certs ca|issue`` and ``geartask keys new|public``: a fleet's certificates and
signing keys from one command (docs/security.md, "Trust: TLS and signatures").

``register(subparsers)`` adds both commands to an argparse sub-parser set (each with
``set_defaults(func=...)``, ``func(args) -> exit status``); ``main_certs``/``main_keys``
are the same commands as ``main(argv)`` functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..arguments import ArgumentParser
from ..errors import EXIT_OK
from . import certs, keys


def _certs_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=ArgumentParser)
    p = sub.add_parser("ca", help="write DIR/ca.pem and DIR/ca.key: the fleet's certificate authority",
                       description="Write DIR/ca.pem (the CA certificate every host trusts) and DIR/ca.key "
                                   "(mode 0600: whoever holds it can admit hosts).")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--name", default="geartask fleet CA", help="the CA's common name")
    p.add_argument("--force", action="store_true", help="replace files that exist")
    p = sub.add_parser("issue", help="write DIR/NAME.pem and DIR/NAME.key: a host certificate signed by DIR's CA",
                       description="Write DIR/NAME.pem and DIR/NAME.key (mode 0600): a certificate for TLS "
                                   "servers and clients, signed by the CA in DIR.")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--ip", action="append", default=[], metavar="IP", help="an IP address it is valid for (repeatable)")
    p.add_argument("--dns", action="append", default=[], metavar="NAME",
                   help="a DNS name it is valid for (repeatable; default: NAME, unless --ip is given)")
    p.add_argument("--force", action="store_true", help="replace files that exist")
    parser.set_defaults(func=run_certs)
    return parser


def _keys_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=ArgumentParser)
    p = sub.add_parser("new", help="write an Ed25519 private key (mode 0600) and print its public key",
                       description="Write an Ed25519 private key to PATH (mode 0600) and print its public key "
                                   "as one line, ed25519:BASE64, for other hosts' security.trust.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--force", action="store_true", help="replace a file that exists")
    p = sub.add_parser("public", help="print the public key of a private key file")
    p.add_argument("path", metavar="PATH")
    parser.set_defaults(func=run_keys)
    return parser


def run_certs(args: argparse.Namespace) -> int:
    if args.action == "ca":
        cert, key = certs.make_ca(Path(args.folder), args.name, args.force)
    else:
        cert, key = certs.issue(Path(args.folder), args.name, args.ip, args.dns, args.force)
    print(f"wrote {cert}")
    print(f"wrote {key} (mode 0600)")
    return EXIT_OK


def run_keys(args: argparse.Namespace) -> int:
    if args.action == "new":
        _, public = keys.new_key(Path(args.path), args.force)
        print(f"wrote {args.path} (mode 0600)", file=sys.stderr)
    else:
        public = keys.public_text(keys.load_private(Path(args.path), args.path))
    print(public)
    return EXIT_OK


def register(subparsers) -> None:
    """Add ``certs`` and ``keys`` to geartask's main argparse sub-parsers."""
    _certs_parser(subparsers.add_parser("certs", help="a fleet CA and host certificates for TLS",
                                        description=__doc__.split("\n\n")[0]))
    _keys_parser(subparsers.add_parser("keys", help="Ed25519 signing keys for jobs and messages"))


def main_certs(argv: Sequence[str] | None = None) -> int:
    args = _certs_parser(ArgumentParser(prog="geartask certs", description="A fleet CA and host certificates.")) \
        .parse_args(argv)
    return args.func(args)


def main_keys(argv: Sequence[str] | None = None) -> int:
    args = _keys_parser(ArgumentParser(prog="geartask keys", description="Ed25519 signing keys.")).parse_args(argv)
    return args.func(args)
