"""Start and stop a real local Rucio: PostgreSQL, the Rucio server under gunicorn, and its daemons.

Test-only, standard library only, so that it runs from the project's venv (pytest,
the benchmark) or any Python. Everything is started as a child process and stopped
by its process id:

* a private PostgreSQL 15 cluster (``initdb``/``pg_ctl`` run as the ``postgres`` user,
  on a free 127.0.0.1 port, in a temporary directory), schema from the rucio package's
  ``tools/reset_database.py``, and beside it the database ``butler`` (with
  ``btree_gist``) for Butler registries, as at the facilities (`LocalRucio.butler_db`);
* the ``rucio`` server package from PyPI in its **own** virtual environment
  (``requirements-rucio-server.txt``; created on first use), served by gunicorn on
  127.0.0.1 over plain HTTP with userpass authentication;
* RSEs on local directories with identity paths, account limits, distances, a scope
  (``bootstrap.py``);
* the real judge-evaluator and conveyor submitter/poller/finisher, in a loop, driving
  the ``localcopy`` transfer tool (``daemons.py``, ``localcopy.py``).

Command line (what ``scripts/rucio_local.sh`` runs)::

    python tests/rucio_harness/local_rucio.py up --dir work/rucio [--scope demo] [--rse NAME=PREFIX ...]
    python tests/rucio_harness/local_rucio.py down --dir work/rucio [--purge]
    python tests/rucio_harness/local_rucio.py restart-server --dir work/rucio

``up`` on a Rucio it already started reuses it, and brings back on their recorded ports,
with their data, whichever of the database, server and daemons is not running;
``down`` stops them and keeps the data for the next ``up`` (``--purge`` deletes it).
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
DEFAULT_VENV = Path(os.environ.get("MULTISITE_RUCIO_VENV", PROJECT / ".rucio-venv"))
REQUIREMENTS = PROJECT / "requirements-rucio-server.txt"
PG_BIN = Path(os.environ.get("MULTISITE_PG_BIN", "/usr/lib/postgresql/15/bin"))
BUTLER_DATABASE = "butler"
DEFAULT_RSES = ("USDF_BUTLER_DISK", "IN2P3_BUTLER_DISK", "RAL_BUTLER_DISK", "LANCS_BUTLER_DISK")
ACTIVITY = "Data Consolidation"
# alembic's env.py configures logging from its ini file: these sections must be there.
ALEMBIC_LOGGING = """[loggers]
keys = root
[handlers]
keys = console
[formatters]
keys = generic
[logger_root]
level = WARN
handlers = console
[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic
[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
"""


class RucioHarnessError(RuntimeError):
    """The local Rucio could not be installed or started; the message says what failed."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], log: Path, env: dict | None = None, cwd: str | None = None) -> None:
    with open(log, "a") as stream:
        stream.write(f"$ {' '.join(command)}\n")
        stream.flush()
        result = subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False
        )
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RucioHarnessError(
            f"{' '.join(command)} failed (exit {result.returncode}); end of {log}:\n{tail}"
        )


def _alive(pid: int | None) -> bool:
    """Whether a process with this id exists."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _kill(pid: int, sig: int = signal.SIGTERM, wait: float = 20.0) -> None:
    """Stop the process group led by ``pid`` (falls back to the process), SIGKILL after ``wait``."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, sig)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            # Not our child (e.g. started by another command): poll for its end.
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def ensure_server_venv(venv: Path = DEFAULT_VENV, log: Path | None = None) -> Path:
    """Return the server venv's python, creating the venv from the pinned requirements if needed.

    Raises
    ------
    RucioHarnessError
        Raised when the venv cannot be created or the server package cannot be installed.
    """
    python = venv / "bin" / "python"
    check = [
        str(python),
        "-c",
        "import importlib.util as u, gunicorn, psycopg; assert u.find_spec('rucio.web.rest')",
    ]
    if python.exists() and subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return python
    log = log or Path(tempfile.gettempdir()) / "rucio-venv-install.log"
    base = os.environ.get("MULTISITE_RUCIO_PYTHON", sys.executable)
    if not python.exists():
        _run([base, "-m", "venv", str(venv)], log)
    _run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], log)
    result = subprocess.run(check, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RucioHarnessError(
            f"Rucio server venv {venv} is unusable after install:\n{result.stderr[-2000:]}"
        )
    return python


class LocalRucio:
    """A local Rucio server with its database and daemons, for tests and the demo.

    Parameters
    ----------
    directory : `pathlib.Path`
        Where its configuration, logs, tokens and state go.
    rses : `dict` [`str`, `str`]
        RSE name -> storage prefix directory. A file ``scope:name`` of an RSE is at
        ``<prefix>/<scope>/<name>``.
    scope : `str`
        Scope to create.
    venv : `pathlib.Path`
        The Rucio server's own virtual environment.
    """

    def __init__(self, directory: Path, rses: dict[str, str], scope: str, venv: Path = DEFAULT_VENV):
        self.directory = Path(directory).resolve()
        self.rses = {name: str(Path(prefix).resolve()) for name, prefix in rses.items()}
        self.scope = scope
        self.venv = venv
        self.account = "root"
        self.username = "ddmlab"
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.pg_port = 0
        self.pg_dir: Path | None = None
        self.server_pid: int | None = None
        self.daemons_pid: int | None = None
        self.python: Path | None = None
        self.logs = self.directory / "logs"
        self.server_config = self.directory / "server" / "rucio.cfg"
        self.client_config = self.directory / "client" / "rucio.cfg"
        self.pause_file = self.directory / "daemons.paused"

    # ----------------------------------------------------------------- state file
    @property
    def state_file(self) -> Path:
        return self.directory / "state.json"

    def save_state(self) -> None:
        state = {
            "port": self.port,
            "pg_port": self.pg_port,
            "pg_dir": str(self.pg_dir) if self.pg_dir else None,
            "server_pid": self.server_pid,
            "daemons_pid": self.daemons_pid,
            "client_config": str(self.client_config),
            "rses": self.rses,
            "scope": self.scope,
        }
        self.state_file.write_text(json.dumps(state, indent=2))

    @classmethod
    def from_state(cls, directory: Path) -> LocalRucio:
        """Rebuild the handle of a Rucio started by ``up`` (to stop it)."""
        state = json.loads((Path(directory) / "state.json").read_text())
        rucio = cls(directory, state["rses"], state["scope"])
        rucio.port, rucio.pg_port = state["port"], state["pg_port"]
        rucio.pg_dir = Path(state["pg_dir"]) if state["pg_dir"] else None
        rucio.server_pid, rucio.daemons_pid = state["server_pid"], state["daemons_pid"]
        return rucio

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def butler_db(self) -> str:
        """The cluster's database for Butler registries (one PostgreSQL schema per repository)."""
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/{BUTLER_DATABASE}"

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> LocalRucio:
        """Install (first time) and start everything; stop what started if a step fails."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.python = ensure_server_venv(self.venv, self.logs / "venv-install.log")
        try:
            self._start_postgres()
            self.port = self.port or free_port()
            self._write_configs()
            env = self._server_env()
            reset = self.venv / "rucio" / "tools" / "reset_database.py"
            if not reset.exists():
                raise RucioHarnessError(
                    f"{reset} not found: is the rucio server package installed in {self.venv}?"
                )
            _run([str(self.python), str(reset)], self.logs / "reset_database.log", env=env)
            self.start_server()
            spec = self.directory / "bootstrap.json"
            spec.write_text(json.dumps({"scope": self.scope, "account": self.account, "rses": self.rses}))
            _run(
                [str(self.python), str(HERE / "bootstrap.py"), str(spec)],
                self.logs / "bootstrap.log",
                env=self._client_env(),
            )
            self.start_daemons()
        except BaseException:
            self.stop()
            raise
        self.save_state()
        return self

    def stop(self, purge: bool = True) -> None:
        """Stop daemons, server and database by process id; remove the database cluster if ``purge``."""
        self.stop_daemons()
        self.stop_server()
        self._stop_postgres(purge)
        if self.state_file.exists():
            self.save_state()

    def resume(self) -> LocalRucio:
        """Start again, on their recorded ports and with their data, whatever is not running."""
        if not self.pg_dir or not (self.pg_dir / "data").is_dir():
            raise RucioHarnessError(
                f"the database cluster of the local Rucio in {self.directory} ({self.pg_dir}) is gone "
                "(a reboot empties /tmp): run 'down --purge', then 'up' for a new, empty Rucio"
            )
        self.logs.mkdir(exist_ok=True)
        pid_file = self.pg_dir / "data" / "postmaster.pid"
        if not (pid_file.exists() and _alive(int(pid_file.read_text().split()[0]))):
            self._pg_ctl_start()
        if not self._answers():
            self.stop_server()
            self.start_server()
        if not _alive(self.daemons_pid):
            self.start_daemons()
        self.save_state()
        return self

    def _server_env(self) -> dict[str, str]:
        return dict(
            os.environ, RUCIO_CONFIG=str(self.server_config), RUCIO_HOME=str(self.server_config.parent)
        )

    def _client_env(self) -> dict[str, str]:
        env = dict(os.environ, RUCIO_CONFIG=str(self.client_config))
        env.pop("RUCIO_HOME", None)
        return env

    def _start_postgres(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RucioHarnessError(
                f"PostgreSQL 15 server binaries not found in {PG_BIN}: run "
                "'apt-get update && apt-get install -y postgresql' (or set MULTISITE_PG_BIN)"
            )
        self.pg_dir = Path(tempfile.mkdtemp(prefix="multisite-rucio-pg-"))
        self.pg_dir.chmod(0o755)
        as_postgres: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.pg_dir, "postgres", "postgres")
            as_postgres = ["runuser", "-u", "postgres", "--"]
        data = self.pg_dir / "data"
        log = self.logs / "initdb.log"
        _run(
            [
                *as_postgres,
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            log,
        )
        self.pg_port = free_port()
        self._pg_ctl_start()
        connect = ["-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres"]
        for database in ("rucio", BUTLER_DATABASE):
            _run([*as_postgres, str(PG_BIN / "createdb"), *connect, database], self.logs / "pg_ctl.log")
        # Butler registries need it (their timespan constraints).
        _run(
            [*as_postgres, str(PG_BIN / "psql"), *connect, "-d", BUTLER_DATABASE]
            + ["-c", "CREATE EXTENSION IF NOT EXISTS btree_gist"],
            self.logs / "pg_ctl.log",
        )

    def _pg_ctl_start(self) -> None:
        """Start the cluster in ``pg_dir`` on ``pg_port``."""
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        data = self.pg_dir / "data"
        options = f"-p {self.pg_port} -k {self.pg_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        _run(
            [
                *as_postgres,
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(self.pg_dir / "postgres.log"),
            ]
            + ["-w", "start"],
            self.logs / "pg_ctl.log",
        )

    def _stop_postgres(self, purge: bool = True) -> None:
        if not self.pg_dir:
            return
        pid_file = self.pg_dir / "data" / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 30
            while pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        if purge:
            shutil.rmtree(self.pg_dir, ignore_errors=True)
            self.pg_dir = None

    def _write_configs(self) -> None:
        package = self.venv / "lib" / f"python{self._venv_python_version()}" / "site-packages" / "rucio"
        migrate = package / "db" / "sqla" / "migrate_repo"
        db_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.pg_port}/rucio"
        server_dir = self.server_config.parent
        (server_dir / "trace").mkdir(parents=True, exist_ok=True)
        (server_dir / "alembic.ini").write_text(
            f"[alembic]\nscript_location = {migrate}\nsqlalchemy.url = {db_url}\n\n" + ALEMBIC_LOGGING
        )
        policy = {"permission": "generic", "schema": "generic", "lfn2pfn_algorithm_default": "identity"}
        server = configparser.ConfigParser(interpolation=None)
        server.read_dict(
            {
                "common": {"logdir": str(self.logs), "loglevel": "INFO"},
                "database": {"default": db_url, "pool_size": "10", "max_overflow": "10", "echo": "0"},
                "bootstrap": {"userpass_identity": self.username, "userpass_pwd": self.password},
                "alembic": {"cfg": str(server_dir / "alembic.ini")},
                "trace": {"tracedir": str(server_dir / "trace")},
                "monitor": {"enable_metrics": "False"},
                "policy": policy,
                "conveyor": {"scheme": "file", "transfertool": "localcopy", "use_preparer": "False"},
                "api": {},
            }
        )
        with open(self.server_config, "w") as stream:
            server.write(stream)
        self.server_config.chmod(0o600)
        self.client_config.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / "tokens").mkdir(exist_ok=True)
        self.write_client_config(self.client_config, self.directory / "tokens" / "root")

    def write_client_config(self, path: Path, token_file: Path) -> Path:
        """Write a client configuration (no [database] section) with its own token file."""
        client = configparser.ConfigParser(interpolation=None)
        client.read_dict(
            {
                "common": {"logdir": str(self.logs), "loglevel": "INFO"},
                "client": {
                    "rucio_host": self.url,
                    "auth_host": self.url,
                    "auth_type": "userpass",
                    "username": self.username,
                    "password": self.password,
                    "account": self.account,
                    "auth_token_file_path": str(token_file),
                    "request_retries": "1",
                },
                "policy": {"permission": "generic", "schema": "generic"},
            }
        )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as stream:
            client.write(stream)
        Path(path).chmod(0o600)
        return Path(path)

    def _venv_python_version(self) -> str:
        out = subprocess.run(
            [
                str(self.python or self.venv / "bin" / "python"),
                "-c",
                "import sys; print('%d.%d' % sys.version_info[:2])",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def start_server(self, timeout: float = 90.0) -> None:
        """Start gunicorn (again, on the same port after `stop_server`) and wait until it answers."""
        log = open(self.logs / "gunicorn.log", "a")
        command = [
            str(self.venv / "bin" / "gunicorn"),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            "2",
            "--threads",
            "4",
            "--worker-class",
            "gthread",
            "--timeout",
            "120",
            "rucio.web.rest.main:application",
        ]
        process = subprocess.Popen(
            command, env=self._server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.server_pid = process.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RucioHarnessError(
                    f"gunicorn exited with {process.returncode}; end of {self.logs / 'gunicorn.log'}:\n"
                    + (self.logs / "gunicorn.log").read_text()[-3000:]
                )
            if self._answers():
                self.save_state()
                return
            time.sleep(0.3)
        raise RucioHarnessError(f"Rucio server did not answer on {self.url}/ping within {timeout} s")

    def _answers(self) -> bool:
        """Whether the server answers its ping."""
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop_server(self) -> None:
        """Stop gunicorn by its process id (its workers are in its process group)."""
        if self.server_pid:
            _kill(self.server_pid)
            self.server_pid = None

    def start_daemons(self) -> None:
        """Start the judge-evaluator and conveyor loop (``daemons.py``)."""
        log = open(self.logs / "daemons.log", "a")
        env = dict(self._server_env(), LOCALCOPY_STATE_DIR=str(self.directory / "localcopy"))
        process = subprocess.Popen(
            [
                str(self.venv / "bin" / "python"),
                str(HERE / "daemons.py"),
                "--pause-file",
                str(self.pause_file),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.daemons_pid = process.pid
        time.sleep(1.0)
        if process.poll() is not None:
            raise RucioHarnessError(
                f"Rucio daemons exited with {process.returncode}; see {self.logs / 'daemons.log'}:\n"
                + (self.logs / "daemons.log").read_text()[-3000:]
            )

    def stop_daemons(self) -> None:
        if self.daemons_pid:
            _kill(self.daemons_pid)
            self.daemons_pid = None

    def pause_daemons(self, timeout: float = 120.0) -> None:
        """Hold transfers back, and return once the daemon loop has stopped between passes."""
        self.pause_file.touch()
        acknowledged = self.pause_file.with_suffix(".ack")
        deadline = time.monotonic() + timeout
        while not acknowledged.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Rucio daemon loop did not pause within {timeout} s")
            time.sleep(0.2)

    def resume_daemons(self) -> None:
        self.pause_file.unlink(missing_ok=True)
        self.pause_file.with_suffix(".ack").unlink(missing_ok=True)

    def secrets(self) -> list[str]:
        """Values from the Rucio configs that must never appear in a log, marker or error."""
        return [self.password]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bring a local Rucio up or down (test harness).")
    parser.add_argument("action", choices=["up", "down", "restart-server"])
    parser.add_argument("--purge", action="store_true", help="down: delete the database too")
    parser.add_argument("--dir", default="work/rucio", help="state, configs and logs (default work/rucio)")
    parser.add_argument("--scope", default="demo")
    parser.add_argument(
        "--rse",
        action="append",
        default=[],
        metavar="NAME=PREFIX",
        help="RSE and its storage prefix (repeatable); default: the four sites under <dir>/storage",
    )
    args = parser.parse_args(argv)
    directory = Path(args.dir).resolve()
    recorded = (directory / "state.json").exists()
    if args.action in ("down", "restart-server") and not recorded:
        print(f"No local Rucio recorded in {directory}.")
        return 0 if args.action == "down" else 1
    if args.action == "down":
        LocalRucio.from_state(directory).stop(purge=args.purge)
        if args.purge:
            (directory / "state.json").unlink()
        print(
            f"Local Rucio in {directory} stopped" + (" and deleted." if args.purge else "; 'up' restarts it.")
        )
        return 0
    if args.action == "restart-server":
        rucio = LocalRucio.from_state(directory)
        rucio.stop_server()
        rucio.start_server()
        print(f"Rucio server restarted at {rucio.url} (pid {rucio.server_pid}).")
        return 0
    if recorded:
        rucio = LocalRucio.from_state(directory).resume()
    else:
        rses = dict(item.split("=", 1) for item in args.rse) or {
            name: str(directory / "storage" / name.split("_")[0].lower()) for name in DEFAULT_RSES
        }
        rucio = LocalRucio(directory, rses, args.scope).start()
    print(f"Local Rucio up at {rucio.url} (server pid {rucio.server_pid}, daemons pid {rucio.daemons_pid}).")
    print(f"Client config: {rucio.client_config}")
    print(f"Butler registries: sites.<site>.registry.db {rucio.butler_db} (one namespace per site)")
    for name, prefix in rucio.rses.items():
        print(f"  RSE {name}: {prefix}/{args.scope}/<Butler-relative path>")
    print(f"Stop it with: scripts/rucio_local.sh down (or {sys.argv[0]} down --dir {directory})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
