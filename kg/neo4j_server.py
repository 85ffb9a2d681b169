"""Start and stop a local Neo4j 5 Community server without Docker.

The jars come from Maven Central (``org.neo4j:neo4j`` pulls the Bolt connector and the server module) and are
cached once under ``${KGREC_CACHE_DIR:-~/.cache/kgrec}/neo4j/<version>/lib``. A server is the real entry point
``org.neo4j.server.CommunityEntryPoint`` run with a fresh home directory, bound to 127.0.0.1 on a free port,
authentication on with a generated password, HTTP and usage reporting off, and a small transaction-log retention.

Typical use::

    with Neo4jServer() as server:          # fetches the jars on first use, starts, waits for Bolt
        store = Neo4jStore(server.uri, server.user, server.password)

Users with their own Neo4j or Aura never need this module: they set ``NEO4J_URI`` / ``NEO4J_USER`` /
``NEO4J_PASSWORD`` / ``NEO4J_DATABASE``.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from kgrec.data.schema import atomic_write_bytes, atomic_write_json
from kgrec.errors import GraphStoreError, Neo4jUnavailableError

logger = logging.getLogger(__name__)

NEO4J_VERSION = "5.26.30"  # newest 5.26 LTS patch on Maven Central when this was written
DEFAULT_USER = "neo4j"

# Java 17 needs these for Neo4j's page cache / native IO and netty (else warnings, slower IO).
JAVA_OPENS = (
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--enable-native-access=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
)

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 http://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>kgrec</groupId>
  <artifactId>kgrec-neo4j-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.neo4j</groupId><artifactId>neo4j</artifactId><version>{version}</version></dependency>
    <dependency><groupId>org.neo4j</groupId><artifactId>neo4j-bolt</artifactId><version>{version}</version></dependency>
    <dependency><groupId>org.neo4j.app</groupId><artifactId>neo4j-server</artifactId><version>{version}</version></dependency>
  </dependencies>
</project>
"""


def cache_dir() -> Path:
    """``$KGREC_CACHE_DIR`` or ``~/.cache/kgrec`` (outside the work tree, so never committed)."""
    return Path(os.environ.get("KGREC_CACHE_DIR") or Path.home() / ".cache" / "kgrec").expanduser()


def neo4j_dir(version: str = NEO4J_VERSION) -> Path:
    return cache_dir() / "neo4j" / version


def lib_dir(version: str = NEO4J_VERSION) -> Path:
    return neo4j_dir(version) / "lib"


def is_fetched(version: str = NEO4J_VERSION) -> bool:
    return (neo4j_dir(version) / "lib.complete").is_file()


def _require_tool(name: str, what: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GraphStoreError(
            f"`{name}` was not found on PATH; {what}. Install OpenJDK 17 and Maven 3.8+ "
            "(Debian: apt-get install openjdk-17-jre-headless maven), or point NEO4J_URI at your own Neo4j."
        )
    return path


def fetch(version: str = NEO4J_VERSION, *, force: bool = False, timeout_s: float = 900) -> Path:
    """Download the Neo4j runtime jars with Maven into the cache (once) and return the ``lib`` directory.

    A ``lib.complete`` stamp is written only after every jar is in place, so an interrupted fetch is redone.
    """
    target = neo4j_dir(version)
    lib = target / "lib"
    if is_fetched(version) and not force:
        return lib
    mvn = _require_tool("mvn", "it is needed once to fetch the Neo4j jars")
    target.mkdir(parents=True, exist_ok=True)
    # Several test sessions may start at once: one fetches, the others wait and reuse its jars.
    with open(target / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_fetched(version) and not force:
            return lib
        return _fetch_locked(mvn, version, target, lib, timeout_s)


def _fetch_locked(mvn: str, version: str, target: Path, lib: Path, timeout_s: float) -> Path:
    (target / "pom.xml").write_text(_POM.format(version=version), encoding="utf-8")
    tmp_lib = Path(tempfile.mkdtemp(dir=target, prefix=".lib-"))
    cmd = [
        mvn, "-q", "-B", "-f", str(target / "pom.xml"),
        f"-Dmaven.repo.local={cache_dir() / 'neo4j' / 'm2'}",
        "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={tmp_lib}",
    ]
    logger.info("fetching Neo4j %s jars with Maven into %s (once)", version, lib)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(tmp_lib, ignore_errors=True)
        raise GraphStoreError(f"fetching Neo4j {version} with Maven took over {timeout_s:.0f}s; check the network") from exc
    if proc.returncode != 0:
        shutil.rmtree(tmp_lib, ignore_errors=True)
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise GraphStoreError(f"Maven could not fetch org.neo4j:neo4j:{version} (exit {proc.returncode}):\n{tail}")
    jars = list(tmp_lib.glob("*.jar"))
    if not any(j.name.startswith(f"neo4j-{version}") for j in jars):
        shutil.rmtree(tmp_lib, ignore_errors=True)
        raise GraphStoreError(f"Maven finished but no neo4j-{version}.jar is in {tmp_lib}")
    if lib.exists():
        shutil.rmtree(lib)
    os.replace(tmp_lib, lib)
    atomic_write_json(target / "lib.complete", {"version": version, "jars": len(jars)})
    logger.info("fetched %d jars for Neo4j %s", len(jars), version)
    return lib


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a killed server's port sits in TIME_WAIT
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Neo4jServer:
    """One local Neo4j Community server process.

    Args:
        home: server home directory (conf/, data/, logs/). A fresh temporary one when None; it is removed by
            ``stop()`` when ``remove_home`` is True (the default for temporary homes).
        port: Bolt port; a free one when None (and a new free one on restart if the old one was taken).
        password: the ``neo4j`` user's password; generated when None. Set before the first start only.
        heap: JVM ``-Xmx`` (``-Xms`` is 512m). pagecache: ``server.memory.pagecache.size``.
        startup_timeout_s: deadline for Bolt to accept ``verify_connectivity()``.
    """

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        port: int | None = None,
        password: str | None = None,
        version: str = NEO4J_VERSION,
        heap: str = "1g",
        pagecache: str = "256m",
        startup_timeout_s: float = 180.0,
        remove_home: bool | None = None,
    ) -> None:
        self._temp_home = home is None
        self.home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="kgrec-neo4j-"))
        self.remove_home = self._temp_home if remove_home is None else remove_home
        self.port = port
        self.user = DEFAULT_USER
        self.password = password or secrets.token_urlsafe(18)
        self.version = version
        self.heap = heap
        self.pagecache = pagecache
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    # ------------------------------------------------------------------ properties
    @property
    def uri(self) -> str:
        if self.port is None:
            raise GraphStoreError("the Neo4j server has no port yet; call start() first")
        return f"bolt://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "neo4j.log"

    @property
    def launcher_log(self) -> Path:
        return self.home / "logs" / "launcher.log"

    def is_running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.pid is not None and _pid_alive(self.pid)

    # ------------------------------------------------------------------ setup
    def _write_conf(self) -> None:
        conf = self.home / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        settings = {
            "server.directories.data": str(self.home / "data"),
            "server.directories.logs": str(self.home / "logs"),
            "server.directories.run": str(self.home / "run"),
            "server.directories.import": str(self.home / "import"),
            "server.directories.plugins": str(self.home / "plugins"),
            "server.default_listen_address": "127.0.0.1",
            "server.default_advertised_address": "127.0.0.1",
            "server.bolt.enabled": "true",
            "server.bolt.listen_address": f"127.0.0.1:{self.port}",
            "server.bolt.advertised_address": f"127.0.0.1:{self.port}",
            "server.bolt.tls_level": "DISABLED",
            "server.http.enabled": "false",
            "server.https.enabled": "false",
            "dbms.usage_report.enabled": "false",
            "dbms.security.auth_enabled": "true",
            "server.memory.pagecache.size": self.pagecache,
            # Local servers see millions of MERGEs in benchmarks: keep transaction logs small.
            "db.tx_log.rotation.retention_policy": "2 files",
            "db.tx_log.rotation.size": "64M",
            "server.logs.gc.enabled": "false",
        }
        text = "".join(f"{k}={v}\n" for k, v in settings.items())
        atomic_write_bytes(conf / "neo4j.conf", text.encode())

    def _java_base(self) -> list[str]:
        java = _require_tool("java", "Neo4j 5 needs a Java 17 runtime")
        return [java, *JAVA_OPENS, "-cp", str(lib_dir(self.version) / "*")]

    def _set_initial_password(self) -> None:
        env = {**os.environ, "NEO4J_HOME": str(self.home), "NEO4J_CONF": str(self.home / "conf")}
        cmd = [*self._java_base(), "-Xmx256m", "org.neo4j.cli.AdminTool",
               "dbms", "set-initial-password", "--", self.password]  # "--": a password may start with "-"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        if proc.returncode != 0:
            raise GraphStoreError(
                f"setting the initial Neo4j password in {self.home} failed (exit {proc.returncode}):\n"
                f"{(proc.stdout + proc.stderr)[-2000:]}"
            )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Neo4jServer:
        """Fetch the jars if needed, write the config, set the password (fresh home only), launch and wait for Bolt.

        Restarting on an existing home keeps its data (crash recovery happens here) and its password.
        """
        if self.is_running():
            return self
        fetch(self.version)
        if self.port is None or not _port_free(self.port):
            self.port = free_port()
        self._write_conf()
        fresh = not (self.home / "data" / "dbms").exists()
        if fresh:
            self._set_initial_password()
        cmd = [
            *self._java_base(), "-Xms512m", f"-Xmx{self.heap}", "-XX:+UseG1GC",
            "org.neo4j.server.CommunityEntryPoint",
            f"--home-dir={self.home}", f"--config-dir={self.home / 'conf'}",
        ]
        log = open(self.launcher_log, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.home, start_new_session=True,
            )
        finally:
            log.close()
        self.pid = self.process.pid
        logger.info("started Neo4j %s (pid %d) on %s, home %s", self.version, self.pid, self.uri, self.home)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        from neo4j import GraphDatabase
        from neo4j.exceptions import AuthError, ServiceUnavailable, SessionExpired

        deadline = time.monotonic() + self.startup_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.is_running():
                raise Neo4jUnavailableError(
                    f"Neo4j exited during startup (code {self.process.returncode if self.process else '?'}); "
                    f"logs in {self.home / 'logs'}:\n{self.log_tail()}"
                )
            try:
                with GraphDatabase.driver(self.uri, auth=(self.user, self.password),
                                          connection_timeout=5) as driver:
                    driver.verify_connectivity()
                logger.info("Neo4j ready on %s", self.uri)
                return
            except AuthError as exc:
                self.kill()
                raise Neo4jUnavailableError(
                    f"Neo4j at {self.uri} refused the password for user '{self.user}' (home {self.home} was "
                    "initialised with another password); use a fresh home or the original password"
                ) from exc
            except (ServiceUnavailable, SessionExpired, OSError) as exc:
                last = exc
                time.sleep(0.5)
        self.kill()
        raise Neo4jUnavailableError(
            f"Neo4j at {self.uri} was not ready after {self.startup_timeout_s:.0f}s ({last}); "
            f"logs in {self.home / 'logs'}:\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for f in (self.launcher_log, self.log_file):
            if f.is_file():
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts) or "(no log written)"

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM (clean shutdown, 7-13 s typically), SIGKILL after ``timeout_s``; removes a temporary home."""
        if self.is_running():
            self._signal(signal.SIGTERM)
            if not self._wait_exit(timeout_s):
                logger.warning("Neo4j (pid %s) ignored SIGTERM for %.0fs; killing it", self.pid, timeout_s)
                self.kill()
        self.process = None
        if self.remove_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server now (no clean shutdown: used by the crash-recovery test). Keeps the home."""
        if self.is_running():
            self._signal(signal.SIGKILL)
            self._wait_exit(30)

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)  # type: ignore[arg-type]
        except ProcessLookupError:
            pass

    def _wait_exit(self, timeout_s: float) -> bool:
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _pid_alive(self.pid):  # type: ignore[arg-type]
                return True
            time.sleep(0.2)
        return False

    def __enter__(self) -> Neo4jServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The ``NEO4J_*`` variables that point kgrec at this server."""
        return {"NEO4J_URI": self.uri, "NEO4J_USER": self.user, "NEO4J_PASSWORD": self.password,
                "NEO4J_DATABASE": "neo4j"}

    def __repr__(self) -> str:
        return f"Neo4jServer(uri={self.uri if self.port else None!r}, home={str(self.home)!r}, pid={self.pid})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


# ---------------------------------------------------------------------- CLI state (kgrec neo4j start|stop|status)
def state_file() -> Path:
    return cache_dir() / "neo4j" / "server.json"


def password_file() -> Path:
    return cache_dir() / "neo4j" / "password"


def write_state(server: Neo4jServer) -> None:
    """Record a CLI-started server (pid, uri, home) and its password in a 0600 file beside it."""
    pw = password_file()
    pw.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(server.password + "\n")
    os.chmod(pw, 0o600)
    atomic_write_json(state_file(), {
        "pid": server.pid, "uri": server.uri, "user": server.user, "home": str(server.home),
        "version": server.version, "password_file": str(pw), "started": time.time(),
    })


def read_state() -> dict[str, Any] | None:
    f = state_file()
    if not f.is_file():
        return None
    return json.loads(f.read_text(encoding="utf-8"))


def server_from_state(state: dict[str, Any]) -> Neo4jServer:
    pw_path = Path(state["password_file"])
    password = pw_path.read_text().strip() if pw_path.is_file() else None
    server = Neo4jServer(state["home"], port=int(state["uri"].rsplit(":", 1)[1]), password=password,
                         version=state.get("version", NEO4J_VERSION), remove_home=False)
    server.pid = int(state["pid"])
    return server


def clear_state() -> None:
    state_file().unlink(missing_ok=True)
    password_file().unlink(missing_ok=True)
