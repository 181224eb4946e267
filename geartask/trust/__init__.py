"""Trust: TLS certificates, Ed25519 signing keys, signed jobs and messages, and the policy a
worker applies to them (docs/security.md, "Trust: TLS and signatures").

Modules: ``files`` (private file writing), ``keys`` (Ed25519 keys), ``certs`` (a fleet CA and
host certificates), ``tls`` (ssl contexts from the config), ``signing`` (the signed job form and
signed messages), ``policy`` (the ``security.trust`` list and the worker's decision),
``stunnel`` (the TLS terminator in front of gearmand), ``cli`` (``geartask certs``/``keys``).
"""
