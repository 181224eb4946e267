"""geartask with trust switched on (issue 19): gearmand behind stunnel with client
certificates, every connection TLS, the sender signing each job with its Ed25519 key, the
workers running only signed jobs (security.require_signed)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import Env, Skip
from .sys_geartask import Geartask, write_config


class GeartaskTLS(Geartask):
    key = "geartask-tls"
    label = "geartask (tls+signed)"
    note = "as geartask, through stunnel (TLS 1.3, client certificates), jobs signed, workers require_signed"
    subdir = "tls"  # PKI, keys and the terminator's files, under the run dir

    def __init__(self):
        super().__init__()
        self.key, self.label = GeartaskTLS.key, GeartaskTLS.label
        self._terminator = None  # stunnel here; bench/sys_geartask_haproxy.py puts HAProxy in its place

    def check(self, env: Env) -> None:
        super().check(env)
        import shutil
        if shutil.which("stunnel") is None and shutil.which("stunnel4") is None:
            raise Skip("needs stunnel (Debian's stunnel4; scripts/install.sh installs it)")

    def _conf(self, env: Env):
        if self._config is None:
            from geartask.config import load_config
            self._config = load_config(self._write(env))
        return self._config

    def _write(self, env: Env) -> Path:
        """PKI, keys and the terminator once per run; the config every process of this system reads."""
        from geartask.server import free_port
        from geartask.trust import certs
        from geartask.trust.keys import new_key
        base = env.run_dir / self.subdir
        path = env.run_dir / f"{self.key}.yaml"
        if path.exists():
            return path
        certs.make_ca(base / "pki")
        certs.issue(base / "pki", "server", ips=["127.0.0.1"])
        certs.issue(base / "pki", "client")
        _, public = new_key(base / "bench.key")
        port = free_port()
        self._terminator = self._start_terminator(env, base, port)
        trust = json.dumps([{"name": "bench", "public_key": public, "may": ["*", "control", "report", "answer"]}])
        return write_config(env, path=path, server=f"tls://127.0.0.1:{port}", log_dir=env.run_dir / (self.key + "-logs"),
                            extra=f"""tls:
  ca: {base / 'pki' / 'ca.pem'}
  cert: {base / 'pki' / 'client.pem'}
  key: {base / 'pki' / 'client.key'}
security:
  key: {base / 'bench.key'}
  require_signed: true
  trust: {trust}
""")

    def _start_terminator(self, env: Env, base: Path, port: int):
        """TLS with client certificates on 127.0.0.1:port, relaying to gearmand (env.port);
        returns an object with pid() and stop()."""
        from geartask.server.stunnel import Stunnel
        stunnel = Stunnel("127.0.0.1", port, env.port, base / "pki" / "ca.pem", base / "pki" / "server.pem",
                          base / "pki" / "server.key", base)
        stunnel.start()
        return stunnel

    def terminator_pid(self) -> int | None:
        return self._terminator.pid() if self._terminator is not None else None

    def _config_path(self, env: Env) -> Path:
        return self._write(env)

    def close(self) -> None:
        super().close()
        if self._terminator is not None:
            self._terminator.stop()
            self._terminator = None
