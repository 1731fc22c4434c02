"""The sandbox for model-written code: `run_program(code, timeout_s, memory_mb) -> ExecutionResult`.

Why a separate process with several fences: HumanEval completions (and anything a chat user pastes) are untrusted
programs. No single mechanism covers every escape, so each one below closes a different door, and whatever the
machine does not allow is named in `ExecutionResult.missing` instead of being silently skipped.

  process          the program runs in its own python (`-I`: no PYTHON* variables, no user site) in a new session,
                   so a wall-clock timeout kills the whole process group.
  environment      a fresh environment (HOME = the work dir, a fixed PATH): none of the parent's variables.
  work dir         a fresh temporary directory as cwd, removed afterwards whatever happened.
  rlimits          RLIMIT_AS (memory_mb), RLIMIT_CPU (timeout + 1 s), RLIMIT_NPROC (fork bombs), RLIMIT_FSIZE (disk
                   fill, also caps the captured output files), RLIMIT_CORE 0.
  unprivileged     when the parent is root, the program runs as `nobody` (65534): root ignores RLIMIT_NPROC.
  namespaces       `unshare --user --map-root-user --net --mount --pid --fork --mount-proc --kill-child`: no network
                   interfaces, its own /proc (the parent's processes and their environ are invisible), and every
                   process of the program dies with the namespace's first process, even one that left the process
                   group with setsid.
  landlock         read and execute only under the Python installation and system directories, write only inside
                   the work dir, no TCP (ABI >= 4), no signals or abstract sockets outside (ABI >= 6). Applied by a
                   small stage-two bootstrap inside the namespaces (Landlock forbids the mounts done before it).

Status: `passed` (exit 0), `failed` (non-zero exit, e.g. an assertion or MemoryError), `timeout` (wall clock or CPU
limit), `error` (the sandbox itself could not start the program). `limit` names the limit that stopped a program
(`wall_time`, `cpu_time`, `memory`, `processes`, `file_size`) when one did.

Landlock is called through its three syscalls with ctypes: the PyPI bindings are a development release, and the
bootstrap must run with nothing but the standard library (it runs under `python -I -S`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "error")
NOBODY = 65534
MAX_OUTPUT_BYTES = 1 << 20  # stdout/stderr files are capped by RLIMIT_FSIZE; more output kills the program
MAX_PROCESSES = 32
UNSHARE_FLAGS = ("--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child")
# Readable (and executable) by the program besides the Python installation: the loader, libraries and /etc files
# (ld.so.cache, localtime) Python needs; /proc is left out on purpose (other processes' environ).
READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/dev/null", "/dev/urandom", "/dev/zero")


@dataclass
class ExecutionResult:
    status: str  # one of STATUSES
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    duration_s: float = 0.0
    limit: str | None = None  # the limit that stopped the program, if one did
    protections: list[str] = field(default_factory=list)  # fences that were applied
    missing: list[str] = field(default_factory=list)  # fences that could not be applied, with the reason
    workdir: str = ""  # the (now removed) work directory, for the record

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---------------------------------------------------------------------------------------------------------------
# Stage two: runs inside the namespaces as `python -I -S -c STAGE_TWO REPORT_FD CONFIG_JSON`, applies the rlimits
# and Landlock, reports what it applied on REPORT_FD, then replaces itself with the program. Standard library only.

STAGE_TWO = r'''
import ctypes, json, os, resource, sys
report_fd, cfg = int(sys.argv[1]), json.loads(sys.argv[2])
applied, missing = [], []

def limit(name, value):
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
        applied.append(name)
    except (OSError, ValueError) as e:
        missing.append(f"{name}: {e}")

limit("RLIMIT_AS", cfg["memory_bytes"])
limit("RLIMIT_CPU", cfg["cpu_s"])
limit("RLIMIT_NPROC", cfg["nproc"])
limit("RLIMIT_FSIZE", cfg["fsize"])
limit("RLIMIT_CORE", 0)

def landlock():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    create, add_rule, restrict = 444, 445, 446  # same numbers on x86_64 and aarch64 (generic syscall table)
    abi = libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return f"not available (errno {ctypes.get_errno()})"
    fs_bits = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}.get(abi, (1 << 16) - 1)
    read_exec = 1 | 4 | 8  # EXECUTE | READ_FILE | READ_DIR
    fields = [fs_bits]
    if abi >= 4:
        fields.append(1 | 2)  # handled_access_net: BIND_TCP | CONNECT_TCP, no rule allows any port
    if abi >= 6:
        fields.append(1 | 2)  # scoped: abstract unix sockets and signals stay inside the sandbox
    attr = (ctypes.c_uint64 * len(fields))(*fields)
    ruleset = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return f"create_ruleset failed (errno {ctypes.get_errno()})"

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    file_only = 1 | 2 | 4 | (1 << 14 if abi >= 3 else 0)  # rights that apply to a single file
    def allow(path, access):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if not os.path.isdir(path):
                access &= file_only
            rule = PathBeneath(access & fs_bits, fd)
            if libc.syscall(add_rule, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
        finally:
            os.close(fd)
    for path in cfg["read_paths"]:
        allow(path, read_exec)
    allow(cfg["workdir"], fs_bits)
    allow("/dev/null", read_exec | 2)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required by restrict_self
        return f"no_new_privs failed (errno {ctypes.get_errno()})"
    if libc.syscall(restrict, ruleset, ctypes.c_uint32(0)) != 0:
        return f"restrict_self failed (errno {ctypes.get_errno()})"
    os.close(ruleset)
    applied.append(f"landlock(abi {abi})")
    return None

try:
    why = landlock()
except Exception as e:  # report, never crash: the parent decides what a missing fence means
    why = f"{type(e).__name__}: {e}"
if why:
    missing.append(f"landlock: {why}")
os.write(report_fd, json.dumps({"applied": applied, "missing": missing, "ready": True}).encode())
os.close(report_fd)
os.execv(cfg["python"], [cfg["python"], "-I", cfg["program"]])
'''


@functools.cache
def _namespace_support(demote: bool) -> str | None:
    """None when unshare with every flag works here (checked once per process), else why not."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "the unshare command is not installed"
    kwargs = dict(user=NOBODY, group=NOBODY, extra_groups=[]) if demote else {}
    try:
        proc = subprocess.run([unshare, *UNSHARE_FLAGS, "true"], capture_output=True, text=True, timeout=10,
                              env={}, **kwargs)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unshare failed: {e}"
    if proc.returncode != 0:
        return f"unshare failed: {proc.stderr.strip() or proc.returncode}"
    return None


def _world_executable(path: str) -> bool:
    """True when any user may execute `path`: the file and every directory above it are open to others."""
    import stat

    real = os.path.realpath(path)
    try:
        if not os.stat(real).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(real)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


@functools.cache
def _sandbox_python(demote: bool) -> str | None:
    """The interpreter for the program: our own, or when we run as root and it lives where `nobody` cannot reach
    (a pyenv under /root), the system's python3 (the programs need the standard library only); None if neither."""
    candidates = [sys.executable, shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")]
    for candidate in filter(None, candidates):
        if not demote or _world_executable(candidate):
            return candidate
    return None


def _read_paths() -> list[str]:
    python_dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                   os.path.dirname(os.path.realpath(sys.executable))}
    return sorted(python_dirs | set(READ_PATHS))


def _processes_mentioning(text: str) -> list[int]:
    """Ids of live processes whose command line or cwd contains `text` (the work dir): the leftover sweep."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry.name}/cwd") if text not in cmdline else ""
        except OSError:
            continue
        if text in cmdline or cwd.startswith(text):
            found.append(int(entry.name))
    return found


def _process_count(uid: int) -> int:
    """Processes (and threads, which RLIMIT_NPROC counts too) of `uid`, from /proc."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(entry.path).st_uid == uid:
                    count += len(os.listdir(f"{entry.path}/task"))
            except OSError:
                continue
    return count


def _kill_everything(proc: subprocess.Popen, workdir: str) -> None:
    """SIGKILL the process group, then any process still running from the work dir (one that called setsid when
    there is no PID namespace to take it down)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if os.path.isdir("/proc"):
        for _ in range(3):
            leftovers = [pid for pid in _processes_mentioning(workdir) if pid != os.getpid()]
            if not leftovers:
                break
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.05)


def _read_capped(path: Path) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_OUTPUT_BYTES)
    return data.decode("utf-8", errors="replace")


def _limit_hit(status: str, returncode: int | None, stderr: str) -> str | None:
    if status == "timeout":
        return "wall_time" if returncode is None else "cpu_time"
    if returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):
        return "file_size"
    tail = stderr[-2000:]
    if "MemoryError" in tail or "Cannot allocate memory" in tail:
        return "memory"
    if "BlockingIOError" in tail or "Resource temporarily unavailable" in tail:
        return "processes"
    return None


def run_program(code: str, timeout_s: float = 10.0, memory_mb: int = 512, *,
                max_processes: int = MAX_PROCESSES) -> ExecutionResult:
    """Run `code` as a Python program in the sandbox and return its ExecutionResult (never raises for what the
    program does; TypeError/ValueError for bad arguments)."""
    if not isinstance(code, str):
        raise TypeError(f"run_program: code must be a str, got {type(code).__name__}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"run_program: timeout_s must be > 0, got {timeout_s!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 32):
        raise ValueError(f"run_program: memory_mb must be an int >= 32, got {memory_mb!r}")
    if sys.platform != "linux":
        return ExecutionResult("error", stderr=f"the sandbox needs Linux, this is {sys.platform}",
                               missing=["everything: not Linux"])

    protections = ["process group", "empty environment", "temporary work dir", "wall-clock timeout"]
    missing: list[str] = []
    demote = os.geteuid() == 0
    python = _sandbox_python(demote)
    if python is None:  # no interpreter nobody can run: stay root, and say that RLIMIT_NPROC does not bind root
        demote, python = False, sys.executable
        missing.append("unprivileged user: no python3 that nobody may execute (root ignores RLIMIT_NPROC)")
    private = tempfile.mkdtemp(prefix="fastsft-run-")  # output files and the work dir, only the parent's
    workdir = os.path.join(private, "work")
    os.mkdir(workdir, 0o700)
    program = os.path.join(workdir, "program.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(code)
    if demote:
        os.chmod(private, 0o711)  # nobody may traverse to its work dir, not list the outputs
        os.chown(workdir, NOBODY, NOBODY)
        os.chown(program, NOBODY, NOBODY)
        protections.append("runs as nobody")

    why_not = _namespace_support(demote)
    command = [python, "-I", "-S", "-c", STAGE_TWO]
    if why_not is None:
        command = [shutil.which("unshare"), *UNSHARE_FLAGS, *command]
        protections.append("user/mount/pid/network namespaces")
    else:
        missing.append(f"namespaces: {why_not}")

    nproc = max_processes
    if why_not is not None and not demote:
        # Without a user namespace RLIMIT_NPROC counts every process of our uid on the machine, not the program's.
        nproc += _process_count(os.getuid())
    config = dict(memory_bytes=memory_mb << 20, cpu_s=math.ceil(timeout_s) + 1, nproc=nproc,
                  fsize=MAX_OUTPUT_BYTES, workdir=workdir, program=program, python=python,
                  read_paths=_read_paths())
    report_read, report_write = os.pipe()
    out_path, err_path = Path(private, "stdout"), Path(private, "stderr")
    start = time.monotonic()
    status, returncode, stage = "error", None, {}
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            kwargs = dict(user=NOBODY, group=NOBODY, extra_groups=[]) if demote else {}
            proc = subprocess.Popen([*command, str(report_write), json.dumps(config)], cwd=workdir,
                                    env={"HOME": workdir, "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(report_write,),
                                    start_new_session=True, **kwargs)
            os.close(report_write)
            report_write = -1
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                _kill_everything(proc, workdir)
        with os.fdopen(report_read, "rb") as f:
            report_read = -1
            raw = f.read()
        stage = json.loads(raw) if raw else {}
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
    except OSError as e:
        stdout, stderr = "", f"sandbox: could not run the program: {e}"
    finally:
        for fd in (report_read, report_write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(private, ignore_errors=True)
    duration = time.monotonic() - start

    protections += stage.get("applied", [])
    missing += stage.get("missing", [])
    if status != "timeout":
        if not stage.get("ready"):
            status = "error"
            stderr = stderr or "sandbox: the bootstrap did not reach the program"
        elif returncode == 0:
            status = "passed"
        elif returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            status = "timeout"
        else:
            status = "failed"
    return ExecutionResult(status=status, stdout=stdout, stderr=stderr, returncode=returncode,
                           duration_s=duration, limit=_limit_hit(status, returncode, stderr),
                           protections=protections, missing=missing, workdir=workdir)
